package state_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/aegis-agent/aegis/internal/state"
)

// badUsers are names that could forge a table row, move the cursor,
// recolour or reorder an operator's terminal, or hide characters.
var badUsers = map[string]string{
	"newline":             "alice\nbob",
	"carriage return":     "alice\rmallory",
	"tab":                 "alice\tx",
	"escape sequence":     "\x1b[2J\x1b[Hok",
	"bell":                "a\x07",
	"delete":              "a\x7f",
	"C1 CSI":              "a\u009b2J",
	"C1 NEL":              "a\u0085b",
	"LRE":                 "a\u202ab",
	"RLO":                 "evil\u202egpj.exe",
	"PDF":                 "a\u202cb",
	"LRI":                 "a\u2066b",
	"PDI":                 "a\u2069b",
	"zero-width space":    "ali\u200bce",
	"zero-width joiner":   "ali\u200dce",
	"byte order mark":     "\ufeffalice",
	"line separator":      "a\u2028b",
	"paragraph separator": "a\u2029b",
	"no-break space":      "a\u00a0b",
	"private use":         "a\ue000",
	"unassigned":          "a\U000e0080",
	"invalid UTF-8":       "a\xffb",
	"cut UTF-8":           "ab\xc3",
	"surrogate half":      "a\xed\xa0\x80",
	"NUL":                 "a\x00b",
	"leading space":       " alice",
	"trailing space":      "alice ",
	"empty":               "",
	"32 bytes":            strings.Repeat("u", 32),
}

func TestValidateUser(t *testing.T) {
	for _, good := range []string{
		"alice", "Alice Smith", "DOMAIN\\alice", "alice@example.net", "o'brien-2", "józef", "東京", "ユーザー",
		"€$+<>=|~^`", "\ufffd", "e\u0301", strings.Repeat("u", state.MaxUserLen), strings.Repeat("é", 15),
	} {
		if err := state.ValidateUser(good); err != nil {
			t.Errorf("ValidateUser(%q): %v", good, err)
		}
		if got := state.Escape(good); got != good {
			t.Errorf("Escape(%q) = %q, want it unchanged", good, got)
		}
	}
	for name, bad := range badUsers {
		if err := state.ValidateUser(bad); !errors.Is(err, state.ErrInvalid) {
			t.Errorf("%s: ValidateUser(%q) = %v, want ErrInvalid", name, bad, err)
		}
	}
}

func TestEscape(t *testing.T) {
	for name, bad := range badUsers {
		got := state.Escape(bad)
		if !state.Printable(got) {
			t.Errorf("%s: Escape(%q) = %q is not printable", name, bad, got)
		}
		if state.Printable(bad) != (got == bad) {
			t.Errorf("%s: Escape(%q) = %q", name, bad, got)
		}
	}
	for in, want := range map[string]string{
		"a\nb":        `"a\nb"`,
		"\x1b[2J":     `"\x1b[2J"`,
		"evil\u202e":  `"evil\u202e"`,
		"a\xffb":      `"a\xffb"`,
		"a\u0085":     `"a\u0085"`,
		"ok, really!": "ok, really!",
	} {
		if got := state.Escape(in); got != want {
			t.Errorf("Escape(%q) = %s, want %s", in, got, want)
		}
	}
}
