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
	"strings"
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
// fields in the event's order, strings unquoted, other values as JSON.
func encodeEntry(out *bytes.Buffer, event []byte, identifier string) error {
	dec := json.NewDecoder(bytes.NewReader(event))
	dec.UseNumber()
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return errors.New("not a JSON object")
	}
	var msg, level string
	var fields [][2]string
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return err
		}
		key, _ := t.(string)
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return err
		}
		val := string(raw)
		if len(raw) > 0 && raw[0] == '"' {
			if err := json.Unmarshal(raw, &val); err != nil {
				return err
			}
		}
		switch key {
		case "message":
			msg = val
		case "level":
			level = val
		case "time":
		default:
			fields = append(fields, [2]string{key, val})
		}
	}
	pri, ok := priorities[level]
	if !ok {
		pri = journal.PriInfo
	}
	text := msg
	for _, f := range fields {
		v := f[1]
		// Quoted when it would not read as one key=value word: with a
		// space, a quote, an equals sign, or anything unprintable (a
		// newline must not start what looks like another line).
		if v == "" || strings.ContainsAny(v, " \"=") || strings.ContainsFunc(v, func(r rune) bool { return !unicode.IsPrint(r) }) {
			v = strconv.Quote(v)
		}
		text += " " + f[0] + "=" + v
	}
	appendField(out, "MESSAGE", text)
	appendField(out, "PRIORITY", strconv.Itoa(int(pri)))
	appendField(out, "SYSLOG_IDENTIFIER", identifier)
	for _, f := range fields {
		appendField(out, journalFieldName(f[0]), f[1])
	}
	return nil
}

// journalFieldName is AEGIS_ and the key upper-cased, with every
// character a journal field name may not hold replaced by '_'.
func journalFieldName(key string) string {
	b := []byte("AEGIS_" + strings.ToUpper(key))
	for i, c := range b {
		if !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			b[i] = '_'
		}
	}
	if len(b) > 64 {
		b = b[:64]
	}
	return string(b)
}

// appendField writes one field in the native protocol: NAME=value, or,
// for a value with a newline, the name, its length and the raw bytes.
func appendField(out *bytes.Buffer, name, value string) {
	if !strings.ContainsRune(value, '\n') {
		out.WriteString(name)
		out.WriteByte('=')
		out.WriteString(value)
		out.WriteByte('\n')
		return
	}
	out.WriteString(name)
	out.WriteByte('\n')
	_ = binary.Write(out, binary.LittleEndian, uint64(len(value)))
	out.WriteString(value)
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
