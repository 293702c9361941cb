package main

import (
	"errors"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// entry is one immutable version of a key. A write never changes an entry;
// it swaps in a new one, so a reader that loaded the pointer sees a value
// and revision that belong together without taking any lock.
type entry struct {
	value    string // compact JSON text
	revision int64
	ttl      *deadline // nil: never expires
}

// slot holds the current version of one key. Writers to the key serialise
// on mu; readers only load cur.
//
// A slot whose key is deleted is removed from the map and its cur set to
// the tombstone. A writer that raced the delete and still holds the old
// slot sees the tombstone and starts again with a fresh slot, so no write
// can land in a slot that is no longer reachable. (A tombstone rather than
// a flag keeps the slot at 16 bytes: this is paid once per key.)
type slot struct {
	mu  sync.Mutex
	cur atomic.Pointer[entry] // nil or tombstone while the key is missing
}

var tombstone = &entry{revision: noRevision}

// load returns the current version, or nil if the key is missing.
func (sl *slot) load() *entry {
	if e := sl.cur.Load(); e != tombstone {
		return e
	}
	return nil
}

// Why a change happened; subscribers of the WebSocket API see it as the
// reason of a "no-value" event.
type reason uint8

const (
	changed reason = iota
	deleted
	expired
)

func (r reason) String() string {
	switch r {
	case deleted:
		return "deleted"
	case expired:
		return "expired"
	}
	return "changed"
}

// noRevision is the revision of a missing key, as GET and events report it.
const noRevision = -1

// Errors of the store. Handlers map them to status codes.
var (
	errConflict = errors.New("revision mismatch")
	errFull     = errors.New("store is full")
)

// conflictError carries the current state of a key whose compare-and-swap
// failed, so the caller can answer with it.
type conflictError struct{ cur *entry } // cur is nil if the key is missing

func (e *conflictError) Error() string { return errConflict.Error() }
func (e *conflictError) Unwrap() error { return errConflict }

// change is one change of a key as it is published: the new version (nil
// if the key is now missing, for the reason why) and its place in the
// change sequence.
type change struct {
	key string
	e   *entry
	why reason
	seq int64
}

// Store is the in-memory key-value store: keys, their current versions,
// the change sequence, and the hook through which every change is
// published.
type Store struct {
	keys       sync.Map     // key string -> *slot
	live       atomic.Int64 // keys that currently hold a value
	maxKeys    int64        // 0: unlimited
	defaultTTL time.Duration
	clock      clock
	expiry     *expiry

	// seqMu orders every change: it numbers it, remembers it and
	// publishes it, so that changes reach every queue in sequence order.
	// It is held with the key's slot locked, so a key's changes are also
	// in revision order.
	seqMu     sync.Mutex
	seq       int64        // the last change's number; guarded by seqMu
	history   history      // guarded by seqMu
	published atomic.Int64 // every change numbered up to it is published

	// publish is called for every change, with the key's slot and seqMu
	// locked. It must not block. It is subs.publish; tests may watch
	// changes through it instead.
	publish func(change)
	subs    registry
}

// NewStore returns an empty store that holds at most maxKeys keys (0: no
// limit) and expires keys by clk (nil: the real clock).
//
// Its change sequence starts at a random multiple of 2^32, so that a
// resume point from another run of the server falls outside the range
// this run knows and leads to a reset, never to a wrong replay. (The
// highest start, about 2^52, leaves the numbers exact in JavaScript.)
func NewStore(maxKeys int64, clk clock) *Store {
	if clk == nil {
		clk = realClock{}
	}
	s := &Store{maxKeys: maxKeys, clock: clk}
	s.publish = s.subs.publish
	s.subs.paths = make(map[string]map[*subscription]struct{})
	s.expiry = &expiry{clock: clk, expire: s.expire}
	s.history.max = defaultHistory
	s.startSequence((1 + rand.Int64N(1<<20)) << 32)
	return s
}

// startSequence makes seq the number of the last change: the next is seq+1.
func (s *Store) startSequence(seq int64) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	s.seq = seq
	s.history.reset(seq + 1)
	s.published.Store(seq)
}

// Get returns the current version of key, or nil if it is missing or
// expired. It checks the deadline itself: the timer may not have run yet.
func (s *Store) Get(key string) *entry {
	v, ok := s.keys.Load(key)
	if !ok {
		return nil
	}
	return s.unexpired(v.(*slot).load())
}

// unexpired returns e, or nil if it has expired.
func (s *Store) unexpired(e *entry) *entry {
	if e != nil && e.ttl != nil && e.ttl.at <= s.now() {
		return nil
	}
	return e
}

func (s *Store) now() int64 { return s.clock.Now().UnixNano() }

// Set stores value under key unconditionally and returns the new version.
// A ttl of 0 makes the key permanent (or gives it the default TTL).
func (s *Store) Set(key, value string, ttl time.Duration) (*entry, error) {
	return s.write(key, func(cur *entry) (*entry, error) {
		return s.newEntry(key, value, cur.next(), ttl), nil
	})
}

// CompareAndSwap stores value under key only if the write would give it
// revision rev: the current revision is rev-1, or the key is missing and
// rev is 0. On a mismatch it returns a *conflictError holding the current
// version.
func (s *Store) CompareAndSwap(key, value string, rev int64, ttl time.Duration) (*entry, error) {
	return s.write(key, func(cur *entry) (*entry, error) {
		if cur.next() != rev {
			return nil, &conflictError{cur}
		}
		return s.newEntry(key, value, rev, ttl), nil
	})
}

// newEntry returns a version of key that expires after ttl (0: never, or
// after the default TTL).
func (s *Store) newEntry(key, value string, rev int64, ttl time.Duration) *entry {
	e := &entry{value: value, revision: rev}
	if ttl == 0 {
		ttl = s.defaultTTL
	}
	if ttl > 0 {
		e.ttl = &deadline{at: s.now() + int64(ttl), key: key, index: -1}
	}
	return e
}

// Delete removes key and reports whether it held a value. With rev >= 0
// it removes it only if its current revision is rev, and otherwise returns
// a *conflictError. Deleting a missing key without a revision is not an
// error.
func (s *Store) Delete(key string, rev int64) (existed bool, err error) {
	_, err = s.write(key, func(cur *entry) (*entry, error) {
		if rev >= 0 && (cur == nil || cur.revision != rev) {
			return nil, &conflictError{cur}
		}
		existed = cur != nil
		return nil, nil
	})
	return existed, err
}

// next is the revision the next write of a key at version e gets.
func (e *entry) next() int64 {
	if e == nil {
		return 0
	}
	return e.revision + 1
}

// write runs change on the current version of key with the key locked,
// installs what it returns (nil deletes the key) and publishes it.
func (s *Store) write(key string, change func(cur *entry) (*entry, error)) (*entry, error) {
	sl := s.lock(key)
	defer sl.mu.Unlock()
	cur := sl.cur.Load()
	if cur != nil && s.unexpired(cur) == nil {
		// Expired, but its timer has not run yet: expire it now, so
		// subscribers see the expiry before the key starts again at 0.
		s.install(key, sl, cur, nil, expired)
		cur = nil
	}
	next, err := change(cur)
	if err == nil && cur == nil && next != nil && !s.reserve() {
		err = errFull
	}
	if err == nil {
		s.install(key, sl, cur, next, deleted)
	}
	s.release(key, sl)
	if err != nil {
		return nil, err
	}
	return next, nil
}

// lock returns the slot of key, locked, creating it if needed.
func (s *Store) lock(key string) *slot {
	for {
		sl := s.slot(key)
		sl.mu.Lock()
		if sl.cur.Load() != tombstone {
			return sl
		}
		sl.mu.Unlock() // deleted meanwhile: take the fresh slot
	}
}

// install makes next the current version of the slot and commits the
// change. why says what a nil next means. The slot must be locked.
func (s *Store) install(key string, sl *slot, cur, next *entry, why reason) {
	sl.cur.Store(next)
	if cur != nil && cur.ttl != nil {
		s.expiry.remove(cur.ttl)
	}
	if next != nil && next.ttl != nil {
		s.expiry.add(next.ttl)
	}
	switch {
	case next != nil:
		s.commit(change{key: key, e: next, why: changed})
	case cur != nil:
		s.live.Add(-1)
		s.commit(change{key: key, why: why})
	}
}

// commit numbers a change, remembers it and publishes it. The key's slot
// must be locked.
func (s *Store) commit(c change) {
	s.seqMu.Lock()
	s.seq++
	c.seq = s.seq
	s.history.add(c.key)
	s.publish(c)
	s.published.Store(c.seq)
	s.seqMu.Unlock()
}

// expire deletes the key of d if its current version is still the one d
// was made for: a write that raced the timer replaced the version, and
// wins.
func (s *Store) expire(d *deadline) {
	v, ok := s.keys.Load(d.key)
	if !ok {
		return
	}
	sl := v.(*slot)
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if cur := sl.cur.Load(); cur != nil && cur != tombstone && cur.ttl == d {
		s.install(d.key, sl, cur, nil, expired)
		s.release(d.key, sl)
	}
}

// slot returns the slot of key, creating it if needed.
func (s *Store) slot(key string) *slot {
	if v, ok := s.keys.Load(key); ok {
		return v.(*slot)
	}
	v, _ := s.keys.LoadOrStore(key, new(slot))
	return v.(*slot)
}

// release removes an empty slot from the map. The slot must be locked.
func (s *Store) release(key string, sl *slot) {
	if sl.cur.Load() == nil {
		sl.cur.Store(tombstone)
		s.keys.CompareAndDelete(key, sl)
	}
}

// reserve counts one more live key, or reports false if the store is full.
func (s *Store) reserve() bool {
	if n := s.live.Add(1); s.maxKeys > 0 && n > s.maxKeys {
		s.live.Add(-1)
		return false
	}
	return true
}

// item is a key with its version, as listings return it.
type item struct {
	key string
	*entry
}

// List returns every key under prefix (which ends with "/"; "/" is every
// key) with its current version, sorted by key.
//
// Range is not a snapshot: a key written during the walk may appear with
// its old or new version, or not at all if it was created after the walk
// passed it. That is the same answer as a listing taken a moment earlier
// or later, which is all a listing promises.
func (s *Store) List(prefix string) []item {
	var items []item
	s.keys.Range(func(k, v any) bool {
		key := k.(string)
		if strings.HasPrefix(key, prefix) {
			if e := s.unexpired(v.(*slot).load()); e != nil {
				items = append(items, item{key, e})
			}
		}
		return true
	})
	sort.Slice(items, func(i, j int) bool { return items[i].key < items[j].key })
	return items
}

// subscription is one registration of a queue on a path: an event
// stream's only one, or one of a WebSocket's several. Its events go to q
// marked with it, so one queue can tell its subscriptions' events apart.
type subscription struct {
	path     string     // a key, a prefix ending with "/", or "/"
	q        *coalescer // where its events go
	kvserver bool       // its client names keys without the leading "/"

	// Set by Subscribe before the subscription is registered; then only
	// the writer of q's events touches them.
	floor   int64 // the resume point its events carry until synced
	syncing bool  // its synced is not yet sent
}

// Where a subscription starts, for Subscribe; any other value is the
// number of a change to resume after.
const (
	fromNow     int64 = -1 // live changes only
	fromScratch int64 = 0  // the whole current state first (?initial)
	fromUnknown int64 = -2 // a resume point that could not be read: reset, then the whole state
)

// Subscribe registers sub for the changes of its path and queues what it
// must know first, as from says:
//
//   - fromNow: nothing, but a mark of its position, so that an event
//     stream has a resume point before any change;
//   - fromScratch: the current state of what it watches (a key's version
//     or its absence, or every existing key under a prefix), then synced;
//   - a change number S: the current state of each watched key that
//     changed after S, a missing key as missing, then synced; or, if S is
//     older than the history, newer than what is published, or another
//     run's, a reset and the whole state, then synced;
//   - fromUnknown: a reset and the whole state, then synced.
//
// Registering comes first, and each key's state is queued with the key
// locked. A change published before that is replaced in the queue by the
// state (a queue keeps one pending event per subscription and key); one
// published after comes after it. So no change falls between the state
// and the live events, and a key's revisions only go up.
//
// Until its synced, everything the subscription sends is tagged with its
// floor, a resume point that is safe wherever the state is cut: S itself
// if S can never be taken for a newer point than it is, else 0, which
// resets. A floor chosen later could race with events already queued.
func (s *Store) Subscribe(sub *subscription, from int64) {
	if from > 0 && from <= s.published.Load() {
		sub.floor = from
	}
	sub.syncing = from != fromNow
	s.subs.add(sub)
	if from == fromNow {
		sub.q.push(event{sub: sub, kind: evMark})
		return
	}
	if from > 0 {
		if keys, upTo, ok := s.changedSince(sub.path, from); ok {
			for _, key := range keys {
				s.queueState(sub, key, true)
			}
			sub.q.push(event{sub: sub, kind: evSynced, seq: upTo})
			return
		}
	}
	if from != fromScratch {
		sub.q.push(event{sub: sub, kind: evReset})
	}
	// Every change numbered up to upTo is published, so the states read
	// after it hold them all; a later change is queued, and comes after.
	upTo := s.published.Load()
	if !strings.HasSuffix(sub.path, "/") {
		s.queueState(sub, sub.path, true)
	} else {
		for _, it := range s.List(sub.path) {
			s.queueState(sub, it.key, false)
		}
	}
	sub.q.push(event{sub: sub, kind: evSynced, seq: upTo})
}

// queueState queues the current state of key for sub, with the key
// locked; a missing key only if evenMissing.
func (s *Store) queueState(sub *subscription, key string, evenMissing bool) {
	sl := s.lock(key)
	if e := s.unexpired(sl.load()); e != nil || evenMissing {
		sub.q.push(event{sub: sub, kind: evState, key: key, e: e})
	}
	s.release(key, sl)
	sl.mu.Unlock()
}

// changedSince returns, in key order, the keys under path (or path itself)
// changed after the change numbered since, and upTo: every change up to
// it is published, and the keys are those of the changes in (since,
// upTo]. It reports false if since is not a point this run can resume
// from: older than the history, or newer than upTo.
//
// The history is read outside seqMu, so that a long scan holds up no
// writer: its chunks are never rewritten, and the entries up to upTo were
// all written before the copy of the chunk list was taken.
func (s *Store) changedSince(path string, since int64) (keys []string, upTo int64, ok bool) {
	s.seqMu.Lock()
	upTo = s.published.Load()
	first := s.history.first
	chunks := slices.Clone(s.history.chunks)
	s.seqMu.Unlock()
	if since < first-1 || since > upTo {
		return nil, upTo, false
	}
	seen := make(map[string]bool)
	for seq := since + 1; seq <= upTo; seq++ {
		i := seq - first
		key := chunks[i/historyChunk][i%historyChunk]
		if watches(path, key) && !seen[key] {
			seen[key] = true
			keys = append(keys, key)
		}
	}
	slices.Sort(keys)
	return keys, upTo, true
}

// watches reports whether a subscription to path sees the changes of key.
func watches(path, key string) bool {
	return path == key || strings.HasSuffix(path, "/") && strings.HasPrefix(key, path)
}

// defaultHistory is how many changes the store remembers (-history).
const defaultHistory = 100_000

// historyChunk is how many changes a chunk of the history holds.
const historyChunk = 4096

// history remembers the key of each recent change, in sequence order: the
// change numbered first+i changed the key at position i. It is a list of
// fixed-size chunks, appended to and dropped whole, never rewritten, so
// that a reader can scan what it saw without holding seqMu. It costs 16
// bytes a change, plus the key's bytes if nothing else holds them; never
// the value.
type history struct {
	chunks [][]string // each historyChunk long when full; oldest first
	first  int64      // the number of chunks[0][0]
	max    int        // at least this many changes are kept
}

func (h *history) reset(first int64) {
	h.chunks = nil
	h.first = first
}

// add remembers the key of the next change.
func (h *history) add(key string) {
	n := len(h.chunks)
	if n == 0 || len(h.chunks[n-1]) == historyChunk {
		if n > 0 && (n-1)*historyChunk >= h.max {
			// The chunks after the first hold max changes already.
			h.chunks[0] = nil // the array keeps its front: let the chunk go
			h.chunks = h.chunks[1:]
			h.first += historyChunk
		}
		h.chunks = append(h.chunks, make([]string, 0, historyChunk))
		n = len(h.chunks)
	}
	h.chunks[n-1] = append(h.chunks[n-1], key)
}

// registry maps each watched path to its subscriptions.
type registry struct {
	mu    sync.RWMutex
	paths map[string]map[*subscription]struct{}
	count atomic.Int64 // registrations, so that publishing to nobody costs one load
}

func (r *registry) add(sub *subscription) {
	r.mu.Lock()
	defer r.mu.Unlock()
	set := r.paths[sub.path]
	if set == nil {
		set = make(map[*subscription]struct{})
		r.paths[sub.path] = set
	}
	if _, ok := set[sub]; !ok {
		set[sub] = struct{}{}
		r.count.Add(1)
	}
}

// Unsubscribe removes the registration of sub.
func (s *Store) Unsubscribe(sub *subscription) { s.subs.remove(sub) }

func (r *registry) remove(sub *subscription) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if set := r.paths[sub.path]; set != nil {
		if _, ok := set[sub]; ok {
			delete(set, sub)
			r.count.Add(-1)
		}
		if len(set) == 0 {
			delete(r.paths, sub.path)
		}
	}
}

// publish queues a change for the subscriptions of its key and of every
// prefix above it: /a/b/c, /a/b/, /a/, /. The cost is the depth of the
// key plus the subscriptions found; the prefixes are substrings of the
// key, so finding them allocates nothing.
func (r *registry) publish(c change) {
	if r.count.Load() == 0 {
		return
	}
	ev := event{kind: evChange, key: c.key, e: c.e, why: c.why, seq: c.seq}
	key := c.key
	r.mu.RLock()
	defer r.mu.RUnlock()
	for sub := range r.paths[key] {
		ev.sub = sub
		sub.q.push(ev)
	}
	for i := len(key) - 1; i >= 0; i-- {
		if key[i] == '/' {
			for sub := range r.paths[key[:i+1]] {
				ev.sub = sub
				sub.q.push(ev)
			}
		}
	}
}

// Len returns the number of keys that hold a value.
func (s *Store) Len() int64 { return s.live.Load() }
