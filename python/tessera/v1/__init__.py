"""Messages of the Tessera wire protocol, generated from Protos/tessera/v1 by scripts/generate-protos.sh."""
