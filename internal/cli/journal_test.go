package cli_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/aegis-agent/aegis/internal/cli"
)

// fakeJournal is a datagram socket standing in for journald's.
type fakeJournal struct {
	path string
	conn *net.UnixConn
}

func newFakeJournal(t *testing.T) *fakeJournal {
	t.Helper()
	path := filepath.Join(t.TempDir(), "journal.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &fakeJournal{path: path, conn: conn}
}

// next reads one entry, from the datagram or from the memfd passed with
// it, and decodes the native protocol into its fields.
func (j *fakeJournal) next(t *testing.T) map[string]string {
	t.Helper()
	buf := make([]byte, 1<<20)
	oob := make([]byte, unix.CmsgSpace(4))
	_ = j.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, oobn, _, _, err := j.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatalf("read the journal socket: %v", err)
	}
	data := buf[:n]
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			t.Fatalf("control message: %v", err)
		}
		fds, err := unix.ParseUnixRights(&msgs[0])
		if err != nil || len(fds) != 1 {
			t.Fatalf("rights: %v", err)
		}
		f := os.NewFile(uintptr(fds[0]), "entry")
		defer f.Close()
		seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
		if err != nil || seals&unix.F_SEAL_WRITE == 0 {
			t.Errorf("memfd seals %#x (%v): journald refuses an unsealed memfd", seals, err)
		}
		if data, err = os.ReadFile(fmt.Sprintf("/proc/self/fd/%d", f.Fd())); err != nil {
			t.Fatal(err)
		}
	}
	return parseNative(t, data)
}

func parseNative(t *testing.T, data []byte) map[string]string {
	t.Helper()
	fields := map[string]string{}
	for len(data) > 0 {
		i := bytes.IndexAny(data, "=\n")
		if i < 0 {
			t.Fatalf("truncated entry: %q", data)
		}
		name := string(data[:i])
		if data[i] == '=' {
			j := bytes.IndexByte(data, '\n')
			fields[name] = string(data[i+1 : j])
			data = data[j+1:]
			continue
		}
		size := binary.LittleEndian.Uint64(data[i+1 : i+9])
		fields[name] = string(data[i+9 : i+9+int(size)])
		if data[i+9+int(size)] != '\n' {
			t.Fatalf("field %s: no newline after %d bytes", name, size)
		}
		data = data[i+10+int(size):]
	}
	return fields
}

func journalLogger(t *testing.T, j *fakeJournal) cli.Globals {
	t.Helper()
	g := cli.Globals{LogLevel: "debug", LogFormat: "journal"}
	g.SetJournalSocket(j.path)
	return g
}

// Priorities as journalctl -p reads them, and the fields of an audit line
// as AEGIS_* fields.
func TestJournalPriorityAndFields(t *testing.T) {
	j := newFakeJournal(t)
	var fallback bytes.Buffer
	g := journalLogger(t, j)
	log := g.Logger(&fallback)

	log.Info().Str("audit", "grant").Str("user", "alice").Str("src", "192.0.2.10").Uint16("port", 22).
		Str("peer", "aegis-controller").Str("result", "created").Msg("grant")
	e := j.next(t)
	want := map[string]string{
		"PRIORITY": "6", "AEGIS_AUDIT": "grant", "AEGIS_USER": "alice", "AEGIS_SRC": "192.0.2.10",
		"AEGIS_PORT": "22", "AEGIS_PEER": "aegis-controller", "AEGIS_RESULT": "created",
		"MESSAGE": "grant audit=grant user=alice src=192.0.2.10 port=22 peer=aegis-controller result=created",
	}
	for k, v := range want {
		if e[k] != v {
			t.Errorf("%s = %q, want %q", k, e[k], v)
		}
	}
	if _, ok := e["AEGIS_TIME"]; ok {
		t.Error("the event's time is repeated: journald stamps entries itself")
	}

	for _, c := range []struct {
		emit func()
		pri  string
	}{
		{func() { log.Error().Err(fmt.Errorf("sweep: %w", os.ErrPermission)).Msg("sweep failed") }, "3"},
		{func() { log.Warn().Msg("w") }, "4"},
		{func() { log.Debug().Msg("d") }, "7"},
	} {
		c.emit()
		if e := j.next(t); e["PRIORITY"] != c.pri {
			t.Errorf("%q: PRIORITY %q, want %s", e["MESSAGE"], e["PRIORITY"], c.pri)
		}
	}

	// A value with a newline takes the length-prefixed form; a field
	// name journald would refuse is mended.
	log.Info().Str("bad key-1", "a\nAEGIS_USER=root").Msg("multi\nline")
	// A value cannot forge a field: the newline form is length-prefixed.
	e = j.next(t)
	if _, forged := e["AEGIS_USER"]; forged {
		t.Error("a value's newline started a field")
	}
	if e["AEGIS_BAD_KEY_1"] != "a\nAEGIS_USER=root" || e["MESSAGE"] != `multi`+"\n"+`line bad key-1="a\nAEGIS_USER=root"` {
		t.Errorf("newline fields: %q", e)
	}
	if fallback.Len() != 0 {
		t.Errorf("fell back to stderr with a working journal: %s", fallback.String())
	}
}

// An entry larger than a datagram goes in a sealed memfd.
func TestJournalLargeEntry(t *testing.T) {
	j := newFakeJournal(t)
	var fallback bytes.Buffer
	g := journalLogger(t, j)
	log := g.Logger(&fallback)
	big := strings.Repeat("x", 4<<20)
	log.Info().Str("blob", big).Msg("large")
	e := j.next(t)
	if e["AEGIS_BLOB"] != big {
		t.Fatalf("AEGIS_BLOB has %d bytes, want %d", len(e["AEGIS_BLOB"]), len(big))
	}
	if fallback.Len() != 0 {
		t.Errorf("fell back to stderr: %d bytes", fallback.Len())
	}
}

// Without a journal, a line is never lost: it goes to stderr as JSON.
func TestJournalFallback(t *testing.T) {
	j := newFakeJournal(t)
	var stderr bytes.Buffer
	g := journalLogger(t, j)
	log := g.Logger(&stderr)
	j.conn.Close()
	os.Remove(j.path)
	log.Error().Msg("journald is restarting")
	if !strings.Contains(stderr.String(), `"message":"journald is restarting"`) {
		t.Fatalf("the line is lost: %q", stderr.String())
	}

	// No journal at start: one warning, then JSON.
	stderr.Reset()
	log = g.Logger(&stderr)
	log.Info().Msg("hello")
	if out := stderr.String(); !strings.Contains(out, "no journal") || !strings.Contains(out, `"message":"hello"`) {
		t.Fatalf("stderr: %q", out)
	}
}

// auto picks the journal exactly when stderr is the stream JOURNAL_STREAM
// names, as systemd documents the check.
func TestJournalAutoDetect(t *testing.T) {
	j := newFakeJournal(t)
	var st unix.Stat_t
	if err := unix.Fstat(unix.Stderr, &st); err != nil {
		t.Fatal(err)
	}
	g := cli.Globals{LogLevel: "info", LogFormat: "auto"}
	g.SetJournalSocket(j.path)

	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", st.Dev, st.Ino))
	log := g.Logger(os.Stderr)
	log.Info().Msg("to the journal")
	if e := j.next(t); e["MESSAGE"] != "to the journal" {
		t.Fatalf("auto under systemd: %q", e)
	}

	// Another stream (stderr redirected by a parent): not the journal.
	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", st.Dev, st.Ino+1))
	var buf bytes.Buffer
	jlog := g.Logger(&buf)
	jlog.Info().Msg("json")
	log = g.Logger(os.Stderr)
	log.Info().Msg("not to the journal")
	_ = j.conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if n, _, err := j.conn.ReadFrom(make([]byte, 4096)); err == nil {
		t.Fatalf("auto with a foreign JOURNAL_STREAM wrote %d bytes to the journal", n)
	}
	if !strings.HasPrefix(buf.String(), `{"level":"info","time":"`) {
		t.Fatalf("auto on a buffer: %q", buf.String())
	}
}

// JSON lines carry sub-second UTC timestamps.
func TestJSONTimestamp(t *testing.T) {
	var buf bytes.Buffer
	g := cli.Globals{LogLevel: "info", LogFormat: "json"}
	xlog := g.Logger(&buf)
	xlog.Info().Msg("x")
	var line struct{ Time string }
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
		t.Fatal(err)
	}
	ts, err := time.Parse(time.RFC3339Nano, line.Time)
	if err != nil || !strings.HasSuffix(line.Time, "Z") || len(line.Time) != len(cli.TimeFormat)-len("Z07:00")+1 {
		t.Fatalf("time %q (%v): want RFC 3339 UTC with microseconds", line.Time, err)
	}
	if d := time.Since(ts); d < 0 || d > time.Minute {
		t.Fatalf("time %s is %s off", line.Time, d)
	}
}

type failing struct {
	cli.Globals
}

func (f *failing) Run() error { return errors.New("open pins: permission denied") }

// A command's final error line carries the journal's error priority when
// stderr is the journal stream, and nothing otherwise.
func TestErrorLinePriority(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	saved, err := unix.Dup(unix.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	restore := func() { _ = unix.Dup2(saved, unix.Stderr); unix.Close(saved) }
	if err := unix.Dup2(int(w.Fd()), unix.Stderr); err != nil {
		restore()
		t.Fatal(err)
	}
	var st unix.Stat_t
	_ = unix.Fstat(unix.Stderr, &st)
	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", st.Dev, st.Ino))
	var f failing
	f.SetJournalSocket(filepath.Join(t.TempDir(), "none.sock"))
	code := cli.Run(context.Background(), cli.Spec{Name: "aegis-test"}, &f, &f.Globals, []string{"--log-format", "json"},
		cli.IO{Stdout: os.Stdout, Stderr: os.Stderr})
	restore()
	w.Close()
	out, _ := io.ReadAll(r)
	if code != 1 || string(out) != "<3>aegis-test: open pins: permission denied\n" {
		t.Fatalf("exit %d, stderr %q", code, out)
	}

	var buf bytes.Buffer
	var g failing
	cli.Run(context.Background(), cli.Spec{Name: "aegis-test"}, &g, &g.Globals, nil, cli.IO{Stdout: &buf, Stderr: &buf})
	if buf.String() != "aegis-test: open pins: permission denied\n" {
		t.Fatalf("not the journal: %q", buf.String())
	}
}

// The cost of one audit line in the journal format, to a socket that
// reads as fast as it can, against the JSON format to a discarding
// writer.
func BenchmarkAuditLine(b *testing.B) {
	audit := func(log zerolog.Logger) {
		log.Info().Str("audit", "grant").Str("api", "agent").Str("user", "alice").Str("proto", "tcp").
			Str("src", "192.0.2.10").Str("dst", "198.51.100.10").Uint16("port", 22).
			Str("peer", "aegis-controller").Str("peer_addr", "198.51.100.5:41234").Str("result", "created").Msg("grant")
	}
	b.Run("journal", func(b *testing.B) {
		path := filepath.Join(b.TempDir(), "journal.sock")
		conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		go func() {
			buf := make([]byte, 1<<16)
			for {
				if _, err := conn.Read(buf); err != nil {
					return
				}
			}
		}()
		g := cli.Globals{LogLevel: "info", LogFormat: "journal"}
		g.SetJournalSocket(path)
		log := g.Logger(io.Discard)
		b.ReportAllocs()
		for b.Loop() {
			audit(log)
		}
	})
	b.Run("json", func(b *testing.B) {
		g := cli.Globals{LogLevel: "info", LogFormat: "json"}
		log := g.Logger(io.Discard)
		b.ReportAllocs()
		for b.Loop() {
			audit(log)
		}
	})
}

func BenchmarkEncodeEntry(b *testing.B) {
	var line bytes.Buffer
	log := zerolog.New(&line).With().Timestamp().Logger()
	log.Info().Str("audit", "grant").Str("api", "agent").Str("user", "alice").Str("proto", "tcp").
		Str("src", "192.0.2.10").Str("dst", "198.51.100.10").Uint16("port", 22).
		Str("peer", "aegis-controller").Str("peer_addr", "198.51.100.5:41234").Str("result", "created").Msg("grant")
	event := line.Bytes()
	var out bytes.Buffer
	b.ReportAllocs()
	for b.Loop() {
		out.Reset()
		if err := cli.EncodeEntry(&out, event, "aegis-controlplane"); err != nil {
			b.Fatal(err)
		}
	}
}

// Every zerolog value type comes through: escaped strings decoded,
// numbers, booleans, arrays and objects as their JSON text.
func TestJournalValueTypes(t *testing.T) {
	j := newFakeJournal(t)
	g := journalLogger(t, j)
	var stderr bytes.Buffer
	log := g.Logger(&stderr)
	log.Warn().Str("quoted", `say "hi"\now`).Strs("names", []string{"a,b", "c]"}).
		Dict("nested", zerolog.Dict().Str("k", "v}").Int("n", -3)).Bool("ok", true).Float64("f", 1.5).
		Interface("nil", nil).Err(errors.New("tab\there")).Msg("types")
	e := j.next(t)
	for k, want := range map[string]string{
		"AEGIS_QUOTED": `say "hi"\now`, "AEGIS_NAMES": `["a,b","c]"]`, "AEGIS_NESTED": `{"k":"v}","n":-3}`,
		"AEGIS_OK": "true", "AEGIS_F": "1.5", "AEGIS_NIL": "null", "AEGIS_ERROR": "tab\there", "PRIORITY": "4",
	} {
		if e[k] != want {
			t.Errorf("%s = %q, want %q", k, e[k], want)
		}
	}
	if stderr.Len() != 0 {
		t.Errorf("fell back: %s", stderr.String())
	}
	// What is not a JSON object is refused (and Write sends it to stderr).
	for _, bad := range []string{`{"a":`, `["x"]`, `{"a" "b"}`, `{"a":"b"`} {
		if err := cli.EncodeEntry(&bytes.Buffer{}, []byte(bad), "x"); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}
