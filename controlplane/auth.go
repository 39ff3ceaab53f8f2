package controlplane

import (
	"context"
	"crypto/x509"
	"net"
	"strings"
	"unicode/utf8"

	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/aegis-agent/aegis/internal/state"
)

// CompatUserInsecure is the user recorded in sessions granted through
// session.SessionManager by a client without a certificate, which only
// --insecure allows. With mutual TLS the user is the client's name (see
// compatUser).
const CompatUserInsecure = "insecure-client"

// peerInfo is who is calling, for authorization and the audit log. It
// only points at what gRPC already holds, so that a call costs no
// allocation for it.
type peerInfo struct {
	addr net.Addr
	// leaf is the client certificate, verified against the client CA;
	// nil without TLS.
	leaf *x509.Certificate
}

func peerOf(ctx context.Context) peerInfo {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return peerInfo{}
	}
	pi := peerInfo{addr: p.Addr}
	if info, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(info.State.VerifiedChains) > 0 && len(info.State.VerifiedChains[0]) > 0 {
		pi.leaf = info.State.VerifiedChains[0][0]
	}
	return pi
}

// name is the client certificate's common name, else its first DNS SAN;
// empty without one.
func (p *peerInfo) name() string {
	switch {
	case p.leaf == nil:
		return ""
	case p.leaf.Subject.CommonName != "":
		return p.leaf.Subject.CommonName
	case len(p.leaf.DNSNames) > 0:
		return p.leaf.DNSNames[0]
	}
	return ""
}

// identity is the peer as the audit log names it. The CA vouches for a
// certificate's names, not for their bytes: a UTF8String or BMPString
// common name may hold any character, an IA5String SAN any ASCII control,
// so the name is cut short and escaped like a client-supplied field.
func (p *peerInfo) identity() string {
	switch {
	case p.name() != "":
		return clip(p.name())
	case p.leaf != nil:
		return "(certificate without a name)"
	}
	return "(no certificate)"
}

// appendAddr appends the peer's address to b without allocating.
func (p *peerInfo) appendAddr(b []byte) []byte {
	switch a := p.addr.(type) {
	case nil:
		return b
	case *net.TCPAddr:
		return a.AddrPort().AppendTo(b)
	default:
		return append(b, a.String()...)
	}
}

// compatUser is the user recorded in a session granted through the compat
// API, whose requests carry none: the client certificate's name, cut to
// the MaxUserLen bytes the map holds (at a character boundary) and
// trimmed of spaces, or CompatUserInsecure without a certificate (or with
// one that has no name). A name that is then not a valid user
// (state.ValidateUser: a control or format character, invalid UTF-8) is
// refused, not mended: the certificate's name is an identity, and one
// that could forge a table row must not grant anything under a
// look-alike.
func compatUser(p *peerInfo) (string, error) {
	name := p.name()
	if name == "" {
		return CompatUserInsecure, nil
	}
	if n := state.MaxUserLen; len(name) > n {
		for n > 0 && !utf8.RuneStart(name[n]) {
			n--
		}
		name = name[:n]
	}
	name = strings.Trim(name, " ")
	if err := state.ValidateUser(name); err != nil {
		return "", status.Errorf(codes.InvalidArgument, "client certificate name %q cannot be a session user (%v): "+
			"issue the client a certificate whose CN or first DNS SAN is printable text", cut(p.name()), err)
	}
	return name, nil
}

// authorizer refuses calls from clients outside the allowlist. The TLS
// layer has already refused clients without a certificate from the client
// CA; this adds the name check, so that a refused client learns why
// instead of seeing a bare handshake failure.
type authorizer struct {
	requireCert bool
	allowed     map[string]bool // lower-cased names; empty: any verified client
	log         zerolog.Logger
}

func newAuthorizer(allowed []string, requireCert bool, log zerolog.Logger) *authorizer {
	a := &authorizer{requireCert: requireCert, allowed: make(map[string]bool), log: log}
	for _, n := range allowed {
		if n = strings.TrimSpace(n); n != "" {
			a.allowed[strings.ToLower(n)] = true
		}
	}
	return a
}

func (a *authorizer) check(ctx context.Context, method string) error {
	if !a.requireCert {
		return nil
	}
	p := peerOf(ctx)
	var err error
	switch {
	case p.leaf == nil:
		err = status.Error(codes.Unauthenticated, "a client certificate issued by the agent's client CA is required")
	case a.allows(p.leaf):
		return nil
	default:
		err = status.Errorf(codes.PermissionDenied, "client %q is not an allowed client name of this agent", p.identity())
	}
	var buf [64]byte
	a.log.Warn().Str("peer", p.identity()).Bytes("peer_address", p.appendAddr(buf[:0])).Str("method", method).Err(err).Msg("call refused")
	return err
}

// allows reports whether a verified client certificate passes the name
// allowlist: its CN or a DNS SAN is on it, or the list is empty.
func (a *authorizer) allows(leaf *x509.Certificate) bool {
	if len(a.allowed) == 0 {
		return true
	}
	if a.allowed[strings.ToLower(leaf.Subject.CommonName)] {
		return true
	}
	for _, n := range leaf.DNSNames {
		if a.allowed[strings.ToLower(n)] {
			return true
		}
	}
	return false
}

func (a *authorizer) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := a.check(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (a *authorizer) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := a.check(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}
