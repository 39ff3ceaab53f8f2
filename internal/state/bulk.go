package state

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/aegis-agent/aegis/bpf"
)

// This file holds the operations that touch many sessions at once: revoking
// a user and moving sessions to a new destination. Both walk the maps and
// then write key by key, so a writer racing them in another process may
// interleave; the control plane serializes its own writers around them.

// RevokeUser deletes every session of user and returns their keys. A
// session that disappears meanwhile (the reaper) is not counted.
func (m *Maps) RevokeUser(user string) ([]Key, error) {
	if err := ValidateUser(user); err != nil {
		return nil, err
	}
	var keys []Key
	for s, err := range m.Sessions() {
		if err != nil {
			return nil, err
		}
		if s.User == user {
			keys = append(keys, s.Key)
		}
	}
	revoked := keys[:0]
	for _, k := range keys {
		err := m.Revoke(k)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return revoked, err
		}
		revoked = append(revoked, k)
	}
	return revoked, nil
}

// MoveResult says what MoveDestinations did.
type MoveResult struct {
	// Moved sessions now have their new destination.
	Moved int
	// Superseded sessions were deleted because a session with the new key
	// existed already; that one was kept as it was.
	Superseded int
}

type move struct {
	from Session
	to   Key
}

// MoveDestinations gives every session whose destination is a key of
// moves that key's value as its destination, keeping the session's
// user, timestamps and timeouts. The moves apply to the sessions as they
// were when it started, so a swap (a→b, b→a) swaps. Where the new key
// already belongs to a session that is not itself moving, that session is
// kept and the moving one is deleted (Superseded).
//
// New keys are inserted before the old ones are deleted, so a session
// passes traffic throughout; on a map too full for that, the remaining
// moves are applied after the deletes.
//
// Returns ErrInvalid, changing nothing, if an address is invalid,
// unspecified, or of another family than its counterpart.
func (m *Maps) MoveDestinations(moves map[netip.Addr]netip.Addr) (MoveResult, error) {
	var res MoveResult
	for from, to := range moves {
		if err := checkMove(from, to); err != nil {
			return res, err
		}
	}
	var pending []move
	fromKeys := make(map[Key]bool)
	toKeys := make(map[Key]bool)
	for s, err := range m.Sessions() {
		if err != nil {
			return res, err
		}
		to, ok := moves[s.Dst]
		if !ok || to == s.Dst {
			continue
		}
		k := s.Key
		k.Dst = to
		pending = append(pending, move{from: s, to: k})
		fromKeys[s.Key] = true
		toKeys[k] = true
	}

	var deferred []move
	for _, mv := range pending {
		// A new key that is itself moving away was read already: overwrite
		// it. Any other existing key wins over the moving session.
		flags := ebpf.UpdateNoExist
		if fromKeys[mv.to] {
			flags = ebpf.UpdateAny
		}
		switch err := m.put(mv.to, mv.from, flags); {
		case err == nil:
			res.Moved++
		case errors.Is(err, ebpf.ErrKeyExist):
			res.Superseded++
		case errors.Is(err, ErrFull):
			deferred = append(deferred, mv)
		default:
			return res, fmt.Errorf("move %s to %s: %w", mv.from.Key, mv.to.Dst, err)
		}
	}
	for _, mv := range pending {
		if toKeys[mv.from.Key] {
			continue // it holds a session moved onto it
		}
		if err := m.Revoke(mv.from.Key); err != nil && !errors.Is(err, ErrNotFound) {
			return res, fmt.Errorf("move %s: %w", mv.from.Key, err)
		}
	}
	for _, mv := range deferred {
		switch err := m.put(mv.to, mv.from, ebpf.UpdateNoExist); {
		case err == nil:
			res.Moved++
		case errors.Is(err, ebpf.ErrKeyExist):
			res.Superseded++
		default:
			// The old key is gone and the new one does not fit: put the
			// session back where it was rather than lose it.
			if rerr := m.put(mv.from.Key, mv.from, ebpf.UpdateNoExist); rerr != nil && !errors.Is(rerr, ebpf.ErrKeyExist) {
				return res, fmt.Errorf("move %s to %s: %w (and restoring it failed: %v)", mv.from.Key, mv.to.Dst, err, rerr)
			}
			return res, fmt.Errorf("move %s to %s: %w", mv.from.Key, mv.to.Dst, err)
		}
	}
	return res, nil
}

func checkMove(from, to netip.Addr) error {
	for _, a := range []netip.Addr{from, to} {
		switch {
		case !a.IsValid():
			return fmt.Errorf("%w: address missing", ErrInvalid)
		case a.IsUnspecified():
			return fmt.Errorf("%w: unspecified address", ErrInvalid)
		case a.Is4In6():
			return fmt.Errorf("%w: IPv4-mapped IPv6 address %s: use the IPv4 address", ErrInvalid, a)
		case a.Zone() != "":
			return fmt.Errorf("%w: address with a zone", ErrInvalid)
		}
	}
	if from.Is4() != to.Is4() {
		return fmt.Errorf("%w: %s and %s are of different families", ErrInvalid, from, to)
	}
	return nil
}

// put writes s's value under key k with the given flags. It returns
// ebpf.ErrKeyExist as is, ErrFull for a full map.
func (m *Maps) put(k Key, s Session, flags ebpf.MapUpdateFlags) error {
	v := s.value()
	return m.guarded(k, func() (*bpf.AegisSessionValue, error) {
		err := m.update(k, &v, flags)
		if errors.Is(err, ebpf.ErrKeyExist) {
			return nil, err
		}
		return &v, updateError(err)
	})
}
