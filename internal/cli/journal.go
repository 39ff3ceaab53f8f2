package cli

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"unicode"

	"github.com/coreos/go-systemd/v22/journal"
	"golang.org/x/sys/unix"
)

// Journal output (--log-format journal, and auto under systemd).
//
// Each zerolog event goes to journald over its native protocol, one
// datagram per entry, rather than as a line on stderr with an sd-daemon
// "<N>" priority prefix. Both give journalctl -p its priorities; only the
// native protocol keeps the fields: every field of the event becomes a
// journal field AEGIS_<KEY> (AEGIS_USER, AEGIS_RESULT, AEGIS_PEER, ...),
// so that "journalctl AEGIS_AUDIT=grant AEGIS_USER=alice" finds one user's
// grants without a grep over JSON. journald stamps each entry with a
// microsecond wall clock (__REALTIME_TIMESTAMP); the event's own time field
// is not repeated. MESSAGE is the event's message followed by its fields as
// key=value, so the default journalctl view reads like the console format.
//
// auto chooses it when stderr is the journal stream systemd set up for the
// unit: JOURNAL_STREAM names that stream's device and inode, and matching
// them against stderr's (go-systemd's StderrIsJournalStream) is the test
// systemd documents; a child whose stderr was redirected does not match.

// JournalSocket is journald's native socket.
const JournalSocket = "/run/systemd/journal/socket"

// journalWriter turns zerolog's JSON events into journal entries. When
// the journal cannot take an entry (journald restarting) the JSON line
// goes to fallback instead, so nothing is lost silently.
type journalWriter struct {
	conn       *net.UnixConn
	addr       *net.UnixAddr
	identifier string
	fallback   io.Writer

	mu  sync.Mutex
	buf bytes.Buffer
}

// newJournalWriter connects to the journal socket at path.
func newJournalWriter(path, identifier string, fallback io.Writer) (*journalWriter, error) {
	addr := &net.UnixAddr{Name: path, Net: "unixgram"}
	// Probe with a connect, so that --log-format journal without a
	// journal says so at once instead of on every line. The writes go
	// through an unconnected socket: one connected to journald's would
	// break for good when journald restarts.
	probe, err := net.DialUnix("unixgram", nil, addr)
	if err != nil {
		return nil, fmt.Errorf("journal socket %s: %w", path, err)
	}
	probe.Close()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("open a socket for the journal: %w", err)
	}
	return &journalWriter{conn: conn, addr: addr, identifier: identifier, fallback: fallback}, nil
}

// priorities are syslog's, as journalctl -p reads them.
var priorities = map[string]journal.Priority{
	"panic": journal.PriEmerg, "fatal": journal.PriCrit, "error": journal.PriErr,
	"warn": journal.PriWarning, "info": journal.PriInfo, "debug": journal.PriDebug, "trace": journal.PriDebug,
}

func (w *journalWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Reset()
	if err := encodeEntry(&w.buf, p, w.identifier); err != nil {
		return w.fallback.Write(p)
	}
	if err := w.send(w.buf.Bytes()); err != nil {
		return w.fallback.Write(p)
	}
	return len(p), nil
}

// send writes one entry; one too large for a datagram goes in a sealed
// memfd passed along, as journald's protocol has it.
func (w *journalWriter) send(entry []byte) error {
	_, _, err := w.conn.WriteMsgUnix(entry, nil, w.addr)
	if err == nil || !(errors.Is(err, unix.EMSGSIZE) || errors.Is(err, unix.ENOBUFS)) {
		return err
	}
	fd, err := unix.MemfdCreate("aegis-journal", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), "aegis-journal")
	defer f.Close()
	if _, err := f.Write(entry); err != nil {
		return err
	}
	if _, err := unix.FcntlInt(f.Fd(), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_WRITE|unix.F_SEAL_SEAL); err != nil {
		return err
	}
	_, _, err = w.conn.WriteMsgUnix(nil, unix.UnixRights(int(f.Fd())), w.addr)
	return err
}

// encodeEntry writes the journal entry of one zerolog JSON event: the
// fields in the event's order, strings unquoted, other values as their
// JSON text. It scans the flat object zerolog writes by hand rather than
// through encoding/json, which cost ten times as much per audit line.
func encodeEntry(out *bytes.Buffer, event []byte, identifier string) error {
	var fieldsBuf [32]field
	fields := fieldsBuf[:0]
	var msg, level []byte
	err := scanObject(event, func(key, val []byte) {
		switch string(key) {
		case "message":
			msg = val
		case "level":
			level = val
		case "time":
		default:
			fields = append(fields, field{key, val})
		}
	})
	if err != nil {
		return err
	}
	pri, ok := priorities[string(level)]
	if !ok {
		pri = journal.PriInfo
	}
	text := make([]byte, 0, len(event))
	text = append(text, msg...)
	for _, f := range fields {
		text = append(text, ' ')
		text = append(text, f.key...)
		text = append(text, '=')
		// Quoted when it would not read as one key=value word: with a
		// space, a quote, an equals sign, or anything unprintable (a
		// newline must not start what looks like another line).
		if len(f.val) == 0 || bytes.ContainsAny(f.val, " \"=") || bytes.ContainsFunc(f.val, func(r rune) bool { return !unicode.IsPrint(r) }) {
			text = strconv.AppendQuote(text, string(f.val))
		} else {
			text = append(text, f.val...)
		}
	}
	appendField(out, "MESSAGE", text)
	appendField(out, "PRIORITY", []byte{'0' + byte(pri)})
	appendField(out, "SYSLOG_IDENTIFIER", []byte(identifier))
	var name [64]byte
	for _, f := range fields {
		appendField(out, journalFieldName(name[:0], f.key), f.val)
	}
	return nil
}

type field struct{ key, val []byte }

var errNotObject = errors.New("not a flat JSON object")

// scanObject calls fn with each key and value of the JSON object in p:
// strings unquoted, any other value (number, boolean, null, array,
// object) as its text. The slices may point into p.
func scanObject(p []byte, fn func(key, val []byte)) error {
	i := skipSpace(p, 0)
	if i >= len(p) || p[i] != '{' {
		return errNotObject
	}
	i = skipSpace(p, i+1)
	if i < len(p) && p[i] == '}' {
		return nil
	}
	for {
		if i >= len(p) || p[i] != '"' {
			return errNotObject
		}
		key, next, err := scanString(p, i)
		if err != nil {
			return err
		}
		i = skipSpace(p, next)
		if i >= len(p) || p[i] != ':' {
			return errNotObject
		}
		i = skipSpace(p, i+1)
		if i >= len(p) {
			return errNotObject
		}
		var val []byte
		if p[i] == '"' {
			if val, next, err = scanString(p, i); err != nil {
				return err
			}
		} else {
			start := i
			if next, err = scanValue(p, i); err != nil {
				return err
			}
			val = p[start:next]
		}
		fn(key, val)
		i = skipSpace(p, next)
		if i >= len(p) {
			return errNotObject
		}
		switch p[i] {
		case ',':
			i = skipSpace(p, i+1)
		case '}':
			return nil
		default:
			return errNotObject
		}
	}
}

func skipSpace(p []byte, i int) int {
	for i < len(p) && (p[i] == ' ' || p[i] == '\t' || p[i] == '\n' || p[i] == '\r') {
		i++
	}
	return i
}

// scanString reads the JSON string starting at p[i] (a quote) and returns
// its contents and the index after it. Only a string with escapes is
// copied and decoded.
func scanString(p []byte, i int) ([]byte, int, error) {
	escaped := false
	for j := i + 1; j < len(p); j++ {
		switch p[j] {
		case '\\':
			escaped = true
			j++
		case '"':
			if !escaped {
				return p[i+1 : j], j + 1, nil
			}
			var s string
			if err := json.Unmarshal(p[i:j+1], &s); err != nil {
				return nil, 0, err
			}
			return []byte(s), j + 1, nil
		}
	}
	return nil, 0, errNotObject
}

// scanValue returns the index after the non-string JSON value at p[i].
func scanValue(p []byte, i int) (int, error) {
	depth := 0
	for i < len(p) {
		switch c := p[i]; c {
		case '"':
			_, next, err := scanString(p, i)
			if err != nil {
				return 0, err
			}
			i = next
			continue
		case '[', '{':
			depth++
		case ']', '}':
			if depth == 0 {
				return i, nil
			}
			depth--
		case ',':
			if depth == 0 {
				return i, nil
			}
		}
		i++
	}
	return 0, errNotObject
}

// journalFieldName appends to dst AEGIS_ and key upper-cased, with every
// character a journal field name may not hold replaced by '_', cut to
// the 64 bytes journald allows.
func journalFieldName(dst, key []byte) string {
	dst = append(dst, "AEGIS_"...)
	for _, c := range key {
		if len(dst) == 64 {
			break
		}
		switch {
		case c >= 'a' && c <= 'z':
			c -= 'a' - 'A'
		case c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_':
		default:
			c = '_'
		}
		dst = append(dst, c)
	}
	return string(dst)
}

// appendField writes one field in the native protocol: NAME=value, or,
// for a value with a newline, the name, its length and the raw bytes.
func appendField(out *bytes.Buffer, name string, value []byte) {
	out.WriteString(name)
	if bytes.IndexByte(value, '\n') < 0 {
		out.WriteByte('=')
		out.Write(value)
		out.WriteByte('\n')
		return
	}
	out.WriteByte('\n')
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], uint64(len(value)))
	out.Write(n[:])
	out.Write(value)
	out.WriteByte('\n')
}

// underJournal reports whether w is the journal stream systemd gave this
// process for stderr.
func underJournal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok || f.Fd() != uintptr(unix.Stderr) {
		return false
	}
	ok, err := journal.StderrIsJournalStream()
	return err == nil && ok
}

// programName is the journal's SYSLOG_IDENTIFIER for this process.
func programName() string { return filepath.Base(os.Args[0]) }

// errorPrefix is "<3>" when w is the journal stream: journald reads an
// sd-daemon priority prefix off each stream line (SyslogLevelPrefix=, on
// by default) and strips it.
func errorPrefix(w io.Writer) string {
	if underJournal(w) {
		return "<3>"
	}
	return ""
}
