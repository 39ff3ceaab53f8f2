package controlplane

import (
	"cmp"
	"encoding/binary"
	"math"
	"slices"
	"time"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/aegis-agent/aegis/bpf"
	"github.com/aegis-agent/aegis/internal/state"
)

// This file encodes the compat snapshot, the session.SessionList that every
// MonitorSessions stream receives, straight into protobuf wire bytes: one
// walk of sessions_v4 and one buffer per snapshot, whatever the number of
// streams.
//
// The existing controller replaces its view with each message, so the list
// must be one message, and its gRPC client accepts at most 4 MiB
// (MaxCallRecvMsgSize's default). One entry of the list, in bytes:
//
//	field 1 tag 1 + length 1 + Session, where Session is
//	  src_ip    tag 1 + varint 1-5 (5 for an address from 16.0.0.0 up)
//	  dst_ip    tag 1 + varint 1-5
//	  dst_port  tag 1 + varint 1-3 (2 from port 128, 3 from 16384)
//	  time_left tag 1 + varint 1-5 (1 up to 127 s, 2 up to 4.5 h); absent when 0
//
// so at most MaxCompatEntrySize = 24 bytes, and 19 in the usual case of
// addresses from 16.0.0.0 up, a port from 128 to 16383 and the 60 s default
// idle timeout. 4 MiB (4,194,304 bytes) hold 174,762 entries in the worst
// case and 220,752 in the usual one: fewer than the 262,144 sessions of a
// full default map whenever each session is an entry of its own (agent API
// sessions, or one any-protocol session per compat grant). The TCP and UDP
// sessions of a compat grant share one entry, so a map full of such pairs
// (131,072 entries) fits, in any case. Proto3 offers no shorter encoding
// that the controller's standard decoding reads: the varints are minimal, a
// fixed32 address would not be read as the uint32 field, and grpc-go limits
// the decompressed size as well.
//
// When the list does not fit, it is cut to the entries that do, the most
// recently active first (then in key order), so that what is left out are
// the sessions idle longest; the cut is counted in a metric and logged when
// it starts and ends.

// MaxCompatEntrySize is the largest encoded size of one entry of a compat
// SessionList, its field tag and length included.
const MaxCompatEntrySize = 24

// compatEntry is one (source, destination, port) of the compat list.
type compatEntry struct {
	lastSeen uint64 // newest of the merged sessions
	src, dst uint32 // compat encoding: big-endian value
	left     int32  // whole seconds, longest of the merged sessions
	port     uint16
}

// compareCompat orders entries by key. It is on the hot path of the
// snapshot (a sort of every session), so it compares lazily.
func compareCompat(a, b compatEntry) int {
	switch {
	case a.src != b.src:
		return cmp.Compare(a.src, b.src)
	case a.dst != b.dst:
		return cmp.Compare(a.dst, b.dst)
	}
	return cmp.Compare(a.port, b.port)
}

func varintFieldSize(v uint64) int {
	if v == 0 {
		return 0 // proto3 leaves out a field at its default
	}
	return 1 + protowire.SizeVarint(v) // the tags of fields 1-4 are one byte
}

func (e *compatEntry) bodySize() int {
	return varintFieldSize(uint64(e.src)) + varintFieldSize(uint64(e.dst)) +
		varintFieldSize(uint64(e.port)) + varintFieldSize(uint64(int64(e.left)))
}

// size is the entry's encoded size in the list, tag and length included.
func (e *compatEntry) size() int {
	b := e.bodySize()
	return 1 + protowire.SizeVarint(uint64(b)) + b
}

func appendVarintField(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

// encodeCompat encodes entries, sorted by key and without duplicates, as a
// session.SessionList of at most maxBytes bytes: byte for byte what
// proto.Marshal makes of the same list. It returns the encoding and how
// many entries it holds; when they do not all fit it keeps the most
// recently active, and reorders entries.
func encodeCompat(entries []compatEntry, maxBytes int) (data []byte, kept int) {
	total := 0
	for i := range entries {
		total += entries[i].size()
	}
	if total > maxBytes {
		slices.SortFunc(entries, func(a, b compatEntry) int {
			if a.lastSeen != b.lastSeen {
				return cmp.Compare(b.lastSeen, a.lastSeen)
			}
			return compareCompat(a, b)
		})
		total = 0
		for kept < len(entries) {
			n := entries[kept].size()
			if total+n > maxBytes {
				break
			}
			total += n
			kept++
		}
		entries = entries[:kept]
		slices.SortFunc(entries, compareCompat)
	}
	data = make([]byte, 0, total)
	for i := range entries {
		e := &entries[i]
		data = protowire.AppendTag(data, 1, protowire.BytesType)
		data = protowire.AppendVarint(data, uint64(e.bodySize()))
		data = appendVarintField(data, 1, uint64(e.src))
		data = appendVarintField(data, 2, uint64(e.dst))
		data = appendVarintField(data, 3, uint64(e.port))
		data = appendVarintField(data, 4, uint64(int64(e.left)))
	}
	return data, len(entries)
}

// compatEntries fills buf with one entry per (source, destination, port) of
// the IPv4 sessions the data path passes at now, sorted by key: where TCP
// and UDP (or an any-protocol session) share one, time_left is the longest.
func compatEntries(m *state.Maps, buf []compatEntry, now uint64) ([]compatEntry, error) {
	cfg, err := m.ReadConfig()
	if err != nil {
		return buf, err
	}
	buf = buf[:0]
	err = m.EachV4(func(k *bpf.AegisSessionKeyV4, v *bpf.AegisSessionValue) bool {
		left, pass := state.ValueTimeLeft(v, cfg.DefaultIdleTimeout, now)
		if pass {
			buf = append(buf, compatEntry{
				lastSeen: v.LastSeenNs,
				src:      binary.BigEndian.Uint32(k.Src[:]),
				dst:      binary.BigEndian.Uint32(k.Dst[:]),
				port:     k.Dport,
				left:     int32(min(left/time.Second, math.MaxInt32)),
			})
		}
		return true
	})
	if err != nil {
		return buf, err
	}
	slices.SortFunc(buf, compareCompat)
	out := buf[:0]
	for _, e := range buf {
		if n := len(out); n > 0 && compareCompat(out[n-1], e) == 0 {
			out[n-1].left = max(out[n-1].left, e.left)
			out[n-1].lastSeen = max(out[n-1].lastSeen, e.lastSeen)
			continue
		}
		out = append(out, e)
	}
	return out, nil
}
