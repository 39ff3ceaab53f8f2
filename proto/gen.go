// Package proto holds the gRPC contracts of aegis-controlplane: the
// original agent's session.SessionManager (session/) and the full
// aegis.agent.v1.AgentService (aegis/agent/v1/). The generated Go code is
// committed; `make generate` rebuilds it with Debian's protoc and the
// plugin versions pinned in go.mod.
package proto

//go:generate bash gen.sh
