package store

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/aegis-agent/aegis/internal/state"
)

// Whatever scanRecordValue accepts, it decodes as encoding/json does.
func checkScan(t *testing.T, b []byte) bool {
	t.Helper()
	got, ok := scanRecordValue(b, userTable{})
	if !ok {
		return false
	}
	var want recordValue
	if err := json.Unmarshal(b, &want); err != nil {
		t.Errorf("scanned %q, which encoding/json refuses: %v", b, err)
	} else if got != want {
		t.Errorf("scanned %q as %+v, encoding/json as %+v", b, got, want)
	}
	return true
}

func TestScanRecordValue(t *testing.T) {
	now := time.Now().UnixNano()
	// What encodeRecord writes is scanned, never left to encoding/json.
	for _, r := range []Record{
		{User: "alice", Created: now, LastSeen: now},
		{User: "bob@example.org", Created: 1, LastSeen: -1, Expires: now + 1, IdleTimeout: time.Hour},
		{User: "x", Created: -1 << 63, LastSeen: 1<<63 - 1},
	} {
		for _, mod := range []int64{0, 7} {
			b := encodeRecord(&r, mod)
			if !checkScan(t, b) {
				t.Errorf("%s: not scanned", b)
			}
		}
	}
	// Everything else encoding/json decides: spaces, escapes, other
	// names, other types, numbers out of range or not integers, trailing
	// bytes.
	for _, b := range []string{
		`{ "user":"a"}`, `{"user" :"a"}`, `{"user":"a" }`, `{"user":"a"} `,
		`{"user":"a\u00e9"}`, `{"user":"\"a"}`, `{"user":"é"}`, "{\"user\":\"a\x7f\"}",
		`{"User":"a"}`, `{"name":"a"}`, `{"user":null}`, `{"user":1}`,
		`{"created_unix_ns":1.5}`, `{"created_unix_ns":1e3}`, `{"created_unix_ns":01}`,
		`{"created_unix_ns":9223372036854775808}`, `{"created_unix_ns":-9223372036854775809}`,
		`{"created_unix_ns":99999999999999999999}`, `{"created_unix_ns":-}`, `{"created_unix_ns":"1"}`,
		`{"user":"a"}x`, `{"user":"a",}`, `{"user":"a"`, `{"user":`, `{`, `{}}`, `[]`, ``,
	} {
		if checkScan(t, []byte(b)) {
			t.Errorf("%s: scanned, want encoding/json to decide", b)
		}
	}
	for _, b := range []string{`{}`, `{"created_unix_ns":-0}`, `{"user":"a","user":"b"}`,
		`{"created_unix_ns":-9223372036854775808}`, `{"mod_revision":0,"user":""}`} {
		if !checkScan(t, []byte(b)) {
			t.Errorf("%s: not scanned", b)
		}
	}
}

func FuzzScanRecordValue(f *testing.F) {
	r := Record{User: "alice", Created: 1, LastSeen: 2, Expires: 3, IdleTimeout: 4}
	f.Add(encodeRecord(&r, 5))
	f.Add([]byte(`{"user":"a\u00e9","created_unix_ns":1e3}`))
	f.Fuzz(func(t *testing.T, b []byte) { checkScan(t, b) })
}

// Decoded records share one string per user name.
func TestDecodeRecordUsers(t *testing.T) {
	users := userTable{}
	k := state.Key{Port: 22}
	r := Record{User: "alice", Created: 1, LastSeen: 1}
	a, _ := scanRecordValue(encodeRecord(&r, 0), users)
	b, _ := scanRecordValue(encodeRecord(&r, 0), users)
	if a.User != "alice" || b.User != "alice" || len(users) != 1 {
		t.Fatalf("users %q %q, table %v", a.User, b.User, users)
	}
	if _, _, err := decodeRecordUsers(k, []byte(`{"user":"alice"`), users); err == nil {
		t.Error("truncated value decoded")
	}
}

func TestParseSessionPathParts(t *testing.T) {
	for _, p := range []string{
		"sessions/192.0.2.1/198.51.100.1/22",
		"sessions/192.0.2.1/198.51.100.1/22/6/1",
		"sessions/192.0.2.1/198.51.100.1/22/6/",
		"sessions//198.51.100.1/22/6",
		"192.0.2.1/198.51.100.1/22/6",
		"sessions/192.0.2.1/198.51.100.1/22/x",
	} {
		if k, err := parseSessionPath(p); err == nil {
			t.Errorf("%q parsed as %v", p, k)
		}
	}
	if k, err := parseSessionPath("sessions/192.0.2.1/198.51.100.1/22/6"); err != nil || k.Port != 22 || k.Proto != state.TCP {
		t.Errorf("parsed %v, %v", k, err)
	}
}
