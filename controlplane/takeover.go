package controlplane

import (
	"hash/maphash"
	"slices"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/aegis-agent/aegis/internal/state"
)

// A grant names a session by its key alone, so a grant for bob of the key
// alice holds would silently hand alice's access to bob. claim decides
// whether a grant may replace the session it finds:
//
//   - a session of the same user is refreshed;
//   - an expired session (one the data path no longer passes, by the one
//     rule of bpf.SessionVerdict) goes to the new user: nobody loses
//     anything;
//   - a live session of another user is refused with AlreadyExists
//     (the key is taken; the grant succeeds once alice's session is
//     revoked or expires), unless the server runs with
//     --allow-session-takeover, when it passes to the new user.
//
// AlreadyExists rather than FailedPrecondition: the refusal is about this
// one key and the next grant of a stream may well succeed, while
// StreamLoginEvents ends the stream on FailedPrecondition, the code of a
// data path no grant can be written to.
//
// The rule is the same on both APIs, with the compat API's user (the
// client certificate's name) as the user: a compat grant of a key an
// agent-API grant gave to alice is refused, and the other way round,
// until one of them expires or is revoked. The two APIs are two
// controllers' views of the gateway; one of them silently undoing the
// other's grant (and its idle timeout and lifetime) is the failure this
// rule exists to prevent. The audit line of every grant that finds
// another user's session names that user in previous_user.
//
// The check costs nothing on the common paths: it is the state.Check of
// the grant's own write (UpsertChecked, GrantAllChecked), which reads the
// session it replaces anyway; a new key is an insert that fails if the
// key exists, so two grants of a free key cannot both create it. Only
// another user's session costs a read of the config map.
//
// What the kernel does not make atomic is the read, the check and the
// overwrite of an existing session: two grants for alice and bob of the
// key of carol's expired session would both find it free, and the later
// would overwrite the earlier's live session unchecked. So this process's
// grants of one key run under the key's lock (keyLocks). Nothing else
// writes a session's user: the data path only updates last_seen (and does
// not revive an expired session), the reaper only deletes expired
// sessions, aegisctl only reads. A session the reaper deletes between the
// read and the write is simply created. One aegis-controlplane serves a
// gateway's maps; a second process granting into the same pins would race
// the check.

// keyLocks is a striped set of mutexes, one stripe per key hash: grants
// of different keys rarely wait for each other, and there is no table of
// keys to grow or clean.
type keyLocks struct {
	seed    maphash.Seed // set by New
	stripes [64]sync.Mutex
}

func (l *keyLocks) index(k *state.Key) int {
	return int(maphash.Comparable(l.seed, *k) % uint64(len(l.stripes)))
}

// lock locks the stripes of keys (at most 3: a compat grant's key and the
// legacy pair it checks), in stripe order so that two callers never
// deadlock, and returns the unlock.
func (l *keyLocks) lock(keys ...state.Key) (unlock func()) {
	var buf [3]int
	held := buf[:0]
	for i := range keys {
		held = append(held, l.index(&keys[i]))
	}
	slices.Sort(held)
	held = slices.Compact(held)
	for _, i := range held {
		l.stripes[i].Lock()
	}
	return func() {
		for i := len(held) - 1; i >= 0; i-- {
			l.stripes[held[i]].Unlock()
		}
	}
}

// claim applies the rule above to one grant of user: its check is the
// state.Check of the write, called with the session found at the key
// between reading it and overwriting it, and it records what it found
// there.
type claim struct {
	s    *Server
	m    *state.Maps
	user string
	// The other user whose session was found, and whether it was live
	// (and the grant allowed to take it over).
	previous string
	takeover bool
}

func (c *claim) check(old *state.Session) error {
	if old.User == c.user {
		return nil
	}
	c.previous = old.User
	cfg, err := c.m.ReadConfig()
	if err != nil {
		return err
	}
	if old.Verdict(cfg.DefaultIdleTimeout, state.Now()).Pass() {
		if !c.s.opts.AllowSessionTakeover {
			return status.Errorf(codes.AlreadyExists,
				"session %v is held by user %q until it is revoked or expires (aegis-controlplane --allow-session-takeover lets a grant take it over)",
				old.Key, cut(old.User))
		}
		c.takeover = true
	}
	if c.s.afterClaim != nil {
		c.s.afterClaim()
	}
	return nil
}

// overlapping returns the keys whose sessions pass some of the traffic of
// key's: an any-protocol session and the TCP and UDP sessions of the same
// tuple. A grant checks them as it checks its own key, so that a live
// session of another user refuses it however the two were granted.
func overlapping(key state.Key) []state.Key {
	tcp, udp, anyProto := key, key, key
	tcp.Proto, udp.Proto, anyProto.Proto = state.TCP, state.UDP, state.Any
	if key.Proto == state.Any {
		return []state.Key{tcp, udp}
	}
	return []state.Key{anyProto}
}

// checkOverlapping applies check to the sessions found at the keys that
// overlap key. Call it with the stripes of those keys locked.
func (c *claim) checkOverlapping(m *state.Maps, key state.Key) error {
	for _, k := range overlapping(key) {
		if old, err := m.Lookup(k); err == nil {
			if err := c.check(&old); err != nil {
				return err
			}
		}
	}
	return nil
}

// grantClaimed writes sess unless a live session of another user holds
// its key or an overlapping one (claim), through the store when there is
// one, waits for the other gateways' acknowledgement, and audits the
// outcome for api. It reports the other user found, if any.
func (s *Server) grantClaimed(p *peerInfo, api string, sess state.Session) (stored state.Session, created bool, previous string, err error) {
	cl := claim{s: s, user: sess.User}
	var rev int64
	s.bulk.RLock()
	unlock := s.keys.lock(append(overlapping(sess.Key), sess.Key)...)
	if s.sl != nil {
		stored, created, rev, err = s.sl.grant(&cl, sess)
	} else {
		err = s.maps.Do(func(m *state.Maps) error {
			cl.m = m
			if err := cl.checkOverlapping(m, sess.Key); err != nil {
				return err
			}
			var err error
			stored, created, err = m.UpsertChecked(sess, cl.check)
			return err
		})
	}
	unlock()
	s.bulk.RUnlock()
	s.sl.ack(rev, opGrant)
	if err != nil {
		err = statusOf(err)
		s.auditGrant(opGrant, api, p, sess.User, cl.previous, &sess.Key, resultOf(err), err)
		return stored, false, cl.previous, err
	}
	s.auditGrant(opGrant, api, p, sess.User, cl.previous, &sess.Key, grantResult(created, cl.previous, cl.takeover), nil)
	return stored, created, cl.previous, nil
}
