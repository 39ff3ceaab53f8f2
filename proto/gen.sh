#!/usr/bin/env bash
# Generates the Go code of the .proto files under proto/, with the
# protoc-gen-go and protoc-gen-go-grpc versions pinned as tools in go.mod.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v protoc >/dev/null 2>&1; then
  echo "gen.sh: protoc not found: run make setup (Debian: protobuf-compiler libprotobuf-dev)" >&2
  exit 1
fi
plugins=$(mktemp -d)
trap 'rm -rf "$plugins"' EXIT
go build -o "$plugins/" google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc

protoc -I . \
  --plugin=protoc-gen-go="$plugins/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="$plugins/protoc-gen-go-grpc" \
  --go_out=. --go_opt=paths=source_relative \
  --go-grpc_out=. --go-grpc_opt=paths=source_relative \
  session/session.proto aegis/agent/v1/agent.proto
