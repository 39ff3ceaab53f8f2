package store

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/aegis-agent/aegis/internal/state"
)

// The key layout, under a prefix (etcd: --store-prefix, default /aegis/):
//
//	sessions/<src>/<dst>/<dport>/<proto>   one session: JSON (recordValue)
//	gateways/<id>                          a live gateway (a key on its lease): JSON (gatewayValue)
//	activity/<id>/<shard>                  a gateway's activity: binary (encodeActivity)
//
// Session keys are readable (etcdctl get --prefix /aegis/sessions/ shows
// who has access to what); the activity is packed, tens of thousands of
// sessions to a value.

const (
	sessionsDir = "sessions/"
	gatewaysDir = "gateways/"
	activityDir = "activity/"
)

// sessionPath is a session's key under the prefix.
func sessionPath(k state.Key) string {
	return sessionsDir + k.Src.String() + "/" + k.Dst.String() + "/" + strconv.Itoa(int(k.Port)) + "/" + strconv.Itoa(int(k.Proto))
}

// parseSessionPath is the inverse of sessionPath, for the part after the
// prefix.
func parseSessionPath(p string) (state.Key, error) {
	rest, ok := strings.CutPrefix(p, sessionsDir)
	src, rest, ok1 := strings.Cut(rest, "/")
	dst, rest, ok2 := strings.Cut(rest, "/")
	dport, proto, ok3 := strings.Cut(rest, "/")
	if !ok || !ok1 || !ok2 || !ok3 || strings.Contains(proto, "/") {
		return state.Key{}, fmt.Errorf("parse session key %q: want sessions/SRC/DST/DPORT/PROTO", p)
	}
	srcIP, err1 := netip.ParseAddr(src)
	dstIP, err2 := netip.ParseAddr(dst)
	port, err3 := strconv.ParseUint(dport, 10, 16)
	protoN, err4 := strconv.ParseUint(proto, 10, 8)
	if err1 != nil || err2 != nil || err3 != nil || err4 != nil {
		return state.Key{}, fmt.Errorf("parse session key %q: malformed", p)
	}
	k := state.Key{Src: srcIP, Dst: dstIP, Port: uint16(port), Proto: state.Protocol(protoN)}
	if err := k.Validate(); err != nil {
		return state.Key{}, fmt.Errorf("parse session key %q: %w", p, err)
	}
	return k, nil
}

// recordValue is a session's stored value.
type recordValue struct {
	User        string `json:"user"`
	Created     int64  `json:"created_unix_ns"`
	LastSeen    int64  `json:"last_seen_unix_ns"`
	Expires     int64  `json:"expires_unix_ns,omitempty"`
	IdleTimeout int64  `json:"idle_timeout_ns,omitempty"`
	// ModRev is the file store's revision of the write; etcd keeps its own.
	ModRev int64 `json:"mod_revision,omitempty"`
}

func encodeRecord(r *Record, modRev int64) []byte {
	b, _ := json.Marshal(recordValue{User: r.User, Created: r.Created, LastSeen: r.LastSeen,
		Expires: r.Expires, IdleTimeout: int64(r.IdleTimeout), ModRev: modRev})
	return b
}

// decodeRecord decodes the stored value b of the session at k.
func decodeRecord(k state.Key, b []byte) (Record, int64, error) {
	return decodeRecordUsers(k, b, nil)
}

// decodeRecordUsers is decodeRecord with a table of user names already
// decoded (nil for none), so that the sessions of one user share one
// string.
func decodeRecordUsers(k state.Key, b []byte, users userTable) (Record, int64, error) {
	v, ok := scanRecordValue(b, users)
	if !ok {
		v = recordValue{}
		if err := json.Unmarshal(b, &v); err != nil {
			return Record{}, 0, fmt.Errorf("decode session %v: %w", k, err)
		}
	}
	r := Record{Key: k, User: v.User, Created: v.Created, LastSeen: v.LastSeen, Expires: v.Expires,
		IdleTimeout: time.Duration(v.IdleTimeout)}
	s := state.Session{Key: k, User: r.User, IdleTimeout: r.IdleTimeout}
	if err := s.Validate(); err != nil {
		return Record{}, 0, fmt.Errorf("decode session %v: %w", k, err)
	}
	return r, v.ModRev, nil
}

// userTable maps user names to one string each.
type userTable map[string]string

// maxUserTable bounds a userTable: past it, names are no longer shared.
const maxUserTable = 1 << 14

func (t userTable) name(b []byte) string {
	if s, ok := t[string(b)]; ok {
		return s
	}
	s := string(b)
	if t != nil && len(t) < maxUserTable {
		t[s] = s
	}
	return s
}

// scanRecordValue decodes b without encoding/json if it has the form
// that encodeRecord writes: an object of recordValue's fields, named
// exactly, in any order, strings of printable ASCII without escapes,
// integers, no spaces. It reports false for anything else, which
// encoding/json then decodes (or refuses) as it always did: what it
// returns with true is what json.Unmarshal returns for b.
func scanRecordValue(b []byte, users userTable) (recordValue, bool) {
	var v recordValue
	if len(b) < 2 || b[0] != '{' {
		return v, false
	}
	i := 1
	if b[i] == '}' {
		return v, len(b) == 2
	}
	for {
		name, j, ok := scanPlainString(b, i)
		if !ok || j >= len(b) || b[j] != ':' {
			return v, false
		}
		i = j + 1
		var n *int64
		switch string(name) {
		case "user":
			s, j, ok := scanPlainString(b, i)
			if !ok {
				return v, false
			}
			v.User, i = users.name(s), j
		case "created_unix_ns":
			n = &v.Created
		case "last_seen_unix_ns":
			n = &v.LastSeen
		case "expires_unix_ns":
			n = &v.Expires
		case "idle_timeout_ns":
			n = &v.IdleTimeout
		case "mod_revision":
			n = &v.ModRev
		default:
			return v, false
		}
		if n != nil {
			if *n, i, ok = scanInt(b, i); !ok {
				return v, false
			}
		}
		if i >= len(b) {
			return v, false
		}
		switch b[i] {
		case ',':
			i++
		case '}':
			return v, i+1 == len(b)
		default:
			return v, false
		}
	}
}

// scanPlainString scans the JSON string at b[i] if it is printable ASCII
// without escapes, and returns its content and the index after it.
func scanPlainString(b []byte, i int) ([]byte, int, bool) {
	if i >= len(b) || b[i] != '"' {
		return nil, 0, false
	}
	for j := i + 1; j < len(b); j++ {
		switch c := b[j]; {
		case c == '"':
			return b[i+1 : j], j + 1, true
		case c < 0x20 || c >= 0x7f || c == '\\':
			return nil, 0, false
		}
	}
	return nil, 0, false
}

// scanInt scans the JSON integer at b[i] (no fraction, no exponent, no
// leading zero, within int64) and returns it and the index after it.
func scanInt(b []byte, i int) (int64, int, bool) {
	neg := i < len(b) && b[i] == '-'
	if neg {
		i++
	}
	start := i
	var u uint64
	for ; i < len(b) && b[i] >= '0' && b[i] <= '9'; i++ {
		if u > (math.MaxUint64-9)/10 {
			return 0, 0, false
		}
		u = u*10 + uint64(b[i]-'0')
	}
	switch {
	case i == start, b[start] == '0' && i-start > 1:
		return 0, 0, false
	case i < len(b) && (b[i] == '.' || b[i] == 'e' || b[i] == 'E'):
		return 0, 0, false
	case neg && u <= 1<<63:
		return -int64(u), i, true
	case !neg && u <= math.MaxInt64:
		return int64(u), i, true
	}
	return 0, 0, false
}

// gatewayValue is a live gateway's key.
type gatewayValue struct {
	// Applied is the revision up to which it applied every session change.
	Applied int64 `json:"applied_revision"`
}

// An activity value is a version byte and entries of a family byte (4 or
// 6), the key (source, destination, big-endian port, protocol) and the
// last-seen time as big-endian Unix nanoseconds: 20 bytes an IPv4 session,
// 44 an IPv6 one.
const (
	activityVersion = 1
	entrySize4      = 1 + 4 + 4 + 2 + 1 + 8
	entrySize6      = 1 + 16 + 16 + 2 + 1 + 8
)

func entrySize(k state.Key) int {
	if k.Is4() {
		return entrySize4
	}
	return entrySize6
}

func appendActivity(b []byte, a *Activity) []byte {
	k := a.Key
	if k.Is4() {
		s, d := k.Src.As4(), k.Dst.As4()
		b = append(b, 4)
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	} else {
		s, d := k.Src.As16(), k.Dst.As16()
		b = append(b, 6)
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, k.Port)
	b = append(b, uint8(k.Proto))
	return binary.BigEndian.AppendUint64(b, uint64(a.LastSeen))
}

// decodeActivity decodes an activity value, skipping nothing: a value it
// cannot read whole is an error.
func decodeActivity(b []byte) ([]Activity, error) {
	if len(b) == 0 {
		return nil, nil
	}
	if b[0] != activityVersion {
		return nil, fmt.Errorf("decode activity: version %d, want %d", b[0], activityVersion)
	}
	b = b[1:]
	out := make([]Activity, 0, len(b)/entrySize4)
	for len(b) > 0 {
		var k state.Key
		var n int
		switch b[0] {
		case 4:
			if len(b) < entrySize4 {
				return nil, fmt.Errorf("decode activity: truncated entry")
			}
			k.Src, k.Dst = netip.AddrFrom4([4]byte(b[1:5])), netip.AddrFrom4([4]byte(b[5:9]))
			n = 9
		case 6:
			if len(b) < entrySize6 {
				return nil, fmt.Errorf("decode activity: truncated entry")
			}
			k.Src, k.Dst = netip.AddrFrom16([16]byte(b[1:17])), netip.AddrFrom16([16]byte(b[17:33]))
			n = 33
		default:
			return nil, fmt.Errorf("decode activity: family %d", b[0])
		}
		k.Port = binary.BigEndian.Uint16(b[n:])
		k.Proto = state.Protocol(b[n+2])
		seen := int64(binary.BigEndian.Uint64(b[n+3:]))
		out = append(out, Activity{Key: k, LastSeen: seen})
		b = b[n+11:]
	}
	return out, nil
}
