import ClusterAdmin
import Testing

@Suite struct NetworkSettingsTests {
    @Test func aLinkIsParsedAsNetemWritesIt() throws {
        let settings = NetworkSettings(delay: "2ms", jitter: "500us", loss: "0.1%", rate: "10gbit")
        let link = try settings.link()
        #expect(
            link
                == LinkProfile(
                    delayMicroseconds: 2_000,
                    jitterMicroseconds: 500,
                    lossPercent: 0.1,
                    rateBitsPerSecond: 10_000_000_000
                )
        )
        #expect(link.netemArguments == ["delay", "2000us", "500us", "loss", "0.1%", "rate", "10000000000bit"])
        #expect(link.description == "delay 2ms ± 0.5ms, loss 0.1%, rate 10.0 Gbit/s")
        #expect(try NetworkSettings().link().isTransparent)
    }

    @Test(arguments: [
        (NetworkSettings(delay: "2"), "network.delay must be a number followed by one of us, ms, s, got \"2\""),
        (NetworkSettings(delay: "2 ms"), "network.delay"),
        (NetworkSettings(delay: "11s"), "network.delay must be in"),
        (NetworkSettings(delay: "1ms", jitter: "2ms"), "network.jitter must be at most network.delay"),
        (NetworkSettings(loss: "101%"), "network.loss must be in 0.0...100.0"),
        (NetworkSettings(loss: "0.1"), "network.loss must be a number followed by one of %"),
        (NetworkSettings(rate: "10gbps"), "one of bit, kbit, mbit, gbit"),
        (NetworkSettings(subnet: "10.1.2.0"), "network.subnet must be an IPv4 range such as 10.213.0.0/24"),
        (NetworkSettings(subnet: "10.1.2.0/28"), "prefix length in 8...25"),
        (NetworkSettings(subnet: "8.8.8.0/24"), "must lie in 10.0.0.0/8"),
        (NetworkSettings(subnet: "172.32.0.0/16"), "must lie in 10.0.0.0/8"),
    ])
    func badValuesAreRefusedNamingTheField(settings: NetworkSettings, message: String) {
        #expect {
            try settings.validate()
        } throws: { error in
            (error as? ClusterAdminError)?.code == .invalidValue && "\(error)".contains(message)
        }
    }

    @Test func theCommandLineFormOverridesKeyByKey() throws {
        let configured = NetworkSettings(delay: "5ms", rate: "1gbit")
        let merged = try configured.merging("delay=2ms,jitter=1ms,seed=7")
        #expect(merged == NetworkSettings(delay: "2ms", jitter: "1ms", rate: "1gbit", seed: 7))
        #expect(throws: ClusterAdminError.self) { try configured.merging("dealy=2ms") }
        #expect {
            try configured.merging("delay")
        } throws: { error in
            "\(error)".contains("subnet, delay, jitter, loss, rate, seed")
        }
        #expect(throws: ClusterAdminError.self) { try configured.merging("seed=-1") }
    }

    @Test func aConfigurationFileCarriesTheSection() throws {
        let settings = try ClusterConfiguration.decode(
            yaml: "network:\n  delay: 2ms\n  jitter: 1ms\n  loss: 0.1%\n  rate: 10gbit\n  seed: 3\n"
        )
        #expect(settings.network == NetworkSettings(delay: "2ms", jitter: "1ms", loss: "0.1%", rate: "10gbit", seed: 3))
        #expect {
            try ClusterConfiguration.decode(yaml: "network:\n  latency: 2ms\n")
        } throws: { error in
            (error as? ClusterAdminError)?.code == .unknownKey && "\(error)".contains("network allows: subnet, delay")
        }
    }

    @Test func rangesOverlapAsTheirPrefixesSay() throws {
        let range = try #require(IPv4Subnet("10.213.4.0/24"))
        #expect(range.address(1) == "10.213.4.1")
        #expect(range.size == 256)
        #expect(range.overlaps(try #require(IPv4Subnet("10.213.0.0/16"))))
        #expect(range.overlaps(try #require(IPv4Subnet("10.213.4.77/32"))))
        #expect(!range.overlaps(try #require(IPv4Subnet("10.213.5.0/24"))))
        #expect(IPv4Subnet("10.213.4.9/24")?.description == "10.213.4.0/24")
        #expect(IPv4Subnet("10.213.4/24") == nil)
        #expect(IPv4Subnet("10.213.4.0/33") == nil)
        #expect(IPv4Subnet("192.168.7.0/24")?.isPrivate == true)
        #expect(IPv4Subnet("192.169.7.0/24")?.isPrivate == false)
    }
}
