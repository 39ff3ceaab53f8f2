package state

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/aegis-agent/aegis/bpf"
)

// Protocol is an IP protocol number a session can carry.
type Protocol uint8

// The protocols a session can carry. Any is the protocol of an
// any-protocol session: one entry, one idle timer, passing TCP and UDP to
// its port. ICMP and ICMPv6 appear only in allow rules.
const (
	Any    Protocol = 0
	ICMP   Protocol = 1
	TCP    Protocol = 6
	UDP    Protocol = 17
	ICMPv6 Protocol = 58
)

func (p Protocol) String() string {
	switch p {
	case Any:
		return "any"
	case ICMP:
		return "icmp"
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMPv6:
		return "icmpv6"
	}
	return strconv.Itoa(int(p))
}

// ParseProtocol accepts the protocols of a session: "tcp", "udp" and
// "any".
func ParseProtocol(s string) (Protocol, error) {
	switch strings.ToLower(s) {
	case "tcp":
		return TCP, nil
	case "udp":
		return UDP, nil
	case "any":
		return Any, nil
	}
	return 0, fmt.Errorf("protocol %q: %w: want tcp, udp or any", s, ErrInvalid)
}

// Reason re-exports the data path's verdict reasons.
type Reason = bpf.Reason

// Reasons lists every verdict reason in counter order.
var Reasons = bpf.Reasons

// MaxUserLen is the longest user name a session can carry: the value's
// user field, NUL-padded and always NUL-terminated.
const MaxUserLen = len(bpf.AegisSessionValue{}.User) - 1

// Key identifies a session: traffic from Src to Dst, destination port Port,
// protocol Proto. Src and Dst are both IPv4 or both IPv6.
type Key struct {
	Src, Dst netip.Addr
	Port     uint16
	Proto    Protocol
}

func (k Key) String() string {
	return fmt.Sprintf("%s %s -> %s", k.Proto, k.Src, netip.AddrPortFrom(k.Dst, k.Port))
}

// Is4 reports whether the key belongs in sessions_v4.
func (k Key) Is4() bool { return k.Src.Is4() }

// Validate returns an error wrapping ErrInvalid unless the key can be
// stored: valid, specified, unmapped addresses of one family, a non-zero
// port, TCP, UDP or Any.
func (k Key) Validate() error {
	switch {
	case !k.Src.IsValid() || !k.Dst.IsValid():
		return fmt.Errorf("%w: address missing", ErrInvalid)
	case k.Src.Is4In6() || k.Dst.Is4In6():
		return fmt.Errorf("%w: IPv4-mapped IPv6 address: use the IPv4 address", ErrInvalid)
	case k.Src.Is4() != k.Dst.Is4():
		return fmt.Errorf("%w: source %s and destination %s are of different families", ErrInvalid, k.Src, k.Dst)
	case k.Src.Zone() != "" || k.Dst.Zone() != "":
		return fmt.Errorf("%w: address with a zone", ErrInvalid)
	case k.Src.IsUnspecified() || k.Dst.IsUnspecified():
		return fmt.Errorf("%w: unspecified address", ErrInvalid)
	case k.Port == 0:
		return fmt.Errorf("%w: port 0", ErrInvalid)
	case k.Proto != TCP && k.Proto != UDP && k.Proto != Any:
		return fmt.Errorf("%w: protocol %d: want tcp, udp or any (0)", ErrInvalid, k.Proto)
	}
	return nil
}

func (k Key) v4() bpf.AegisSessionKeyV4 {
	return bpf.AegisSessionKeyV4{Src: k.Src.As4(), Dst: k.Dst.As4(), Dport: k.Port, Proto: uint8(k.Proto)}
}

func (k Key) v6() bpf.AegisSessionKeyV6 {
	return bpf.AegisSessionKeyV6{Src: k.Src.As16(), Dst: k.Dst.As16(), Dport: k.Port, Proto: uint8(k.Proto)}
}

func keyFromV4(k *bpf.AegisSessionKeyV4) Key {
	return Key{Src: netip.AddrFrom4(k.Src), Dst: netip.AddrFrom4(k.Dst), Port: k.Dport, Proto: Protocol(k.Proto)}
}

func keyFromV6(k *bpf.AegisSessionKeyV6) Key {
	return Key{Src: netip.AddrFrom16(k.Src), Dst: netip.AddrFrom16(k.Dst), Port: k.Dport, Proto: Protocol(k.Proto)}
}

// Session is one entry of a sessions map. Timestamps are on the data path's
// clock (Now).
type Session struct {
	Key
	User string
	// LastSeen is when the session last passed a packet (to within
	// bpf.RefreshGranularity) or was granted.
	LastSeen uint64
	// Created is when the session was first granted.
	Created uint64
	// Expires is the end of the session's lifetime; 0 for no cap.
	Expires uint64
	// IdleTimeout is the session's own idle timeout; 0 for the config
	// map's default.
	IdleTimeout time.Duration
}

// Validate checks the key, the user and the durations.
func (s *Session) Validate() error {
	if err := s.Key.Validate(); err != nil {
		return err
	}
	if err := ValidateUser(s.User); err != nil {
		return err
	}
	if s.IdleTimeout < 0 {
		return fmt.Errorf("%w: negative idle timeout", ErrInvalid)
	}
	return nil
}

// Verdict tells whether the data path passes the session's traffic at now,
// given the config map's default idle timeout: the same rule as the data
// path (bpf.SessionVerdict).
func (s *Session) Verdict(defaultIdle time.Duration, now uint64) Reason {
	v := s.value()
	r, _ := bpf.SessionVerdict(&v, uint64(defaultIdle), now)
	return r
}

// IdleLeft is how long the session may stay idle from now before the data
// path refuses it; 0 if it already does. It ignores the lifetime cap.
func (s *Session) IdleLeft(defaultIdle time.Duration, now uint64) time.Duration {
	idle := s.IdleTimeout
	if idle == 0 {
		idle = defaultIdle
	}
	left := idle - time.Duration(int64(now-s.LastSeen))
	return max(left, 0)
}

// TimeLeft is how long from now until the data path stops passing the
// session if it stays idle: its idle expiry, or the end of its lifetime if
// that comes first; 0 if it already refuses it.
func (s *Session) TimeLeft(defaultIdle time.Duration, now uint64) time.Duration {
	left := s.IdleLeft(defaultIdle, now)
	if s.Expires != 0 {
		left = min(left, max(time.Duration(int64(s.Expires-now)), 0))
	}
	return left
}

func (s *Session) value() bpf.AegisSessionValue {
	v := bpf.AegisSessionValue{
		LastSeenNs:    s.LastSeen,
		CreatedNs:     s.Created,
		ExpiresNs:     s.Expires,
		IdleTimeoutNs: uint64(s.IdleTimeout),
	}
	for i := 0; i < len(s.User) && i < len(v.User)-1; i++ {
		v.User[i] = int8(s.User[i])
	}
	return v
}

func sessionFrom(k Key, v *bpf.AegisSessionValue) Session {
	return Session{
		Key:         k,
		User:        userString(&v.User),
		LastSeen:    v.LastSeenNs,
		Created:     v.CreatedNs,
		Expires:     v.ExpiresNs,
		IdleTimeout: time.Duration(v.IdleTimeoutNs),
	}
}

func userString(u *[MaxUserLen + 1]int8) string {
	b := make([]byte, 0, len(u))
	for _, c := range u {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}
