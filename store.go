package main

import (
	"errors"
	"math/rand/v2"
	"sort"
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
	key string                // the map's own string, which the history shares
}

var tombstone = &entry{revision: noRevision}

// load returns the current version, or nil if the key is missing.
func (sl *slot) load() *entry {
	if e := sl.cur.Load(); e != tombstone {
		return e
	}
	return nil
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

	// With -data, a change is published, answered and shown to readers
	// only once its record is in the data files: a slot's cur is then
	// the version on disk, and the journal holds a newer one while its
	// change is being written. Writers work on the newer one, so that
	// writes to a key go on while the earlier ones are written; readers
	// load cur, as they do without -data.
	journal journal // nil: memory only

	deletes, expiries atomic.Int64 // keys deleted and expired, for /metrics
	liveBytes         atomic.Int64 // bytes of the keys and values held, for compaction
}

// journal is the store's one hook for durability: with -data, the data
// files (dataDir). A change goes to it, numbered, before anyone is told
// of it; it hands the change back to reveal once the change is written.
// Meanwhile it keeps the key's newest version, which writers of the key
// work on.
type journal interface {
	// queue takes a numbered change and returns the batch it will be
	// written in. seqMu is held, so changes come in sequence order.
	queue(c change) *batch
	// hold keeps e, of the change numbered seq in batch b, as key's
	// newest version until the change is written.
	hold(key string, sl *slot, e *entry, seq int64, b *batch)
	// pending returns key's newest version and its batch, if a change
	// of the key is still to be written.
	pending(key string, sl *slot) (*entry, *batch, bool)
	// written forgets what hold kept, once c, the key's newest change,
	// is written.
	written(c change)
}

// latest returns the newest version of a locked slot, the one writes work
// on, and with -data the batch of its change if that is not yet written.
func (s *Store) latest(key string, sl *slot) (*entry, *batch) {
	if s.journal != nil {
		if e, b, ok := s.journal.pending(key, sl); ok {
			return e, b
		}
	}
	return sl.load(), nil
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
// installs what it returns (nil deletes the key) and publishes it. With
// -data it returns once the key's changes, this one or those it saw, are
// in the data files: the answer a client gets, a conflict included, tells
// of nothing a crash could take back.
func (s *Store) write(key string, change func(cur *entry) (*entry, error)) (*entry, error) {
	sl := s.lock(key)
	next, err := s.writeLocked(key, sl, change)
	_, pending := s.latest(key, sl)
	sl.mu.Unlock()
	if pending != nil {
		if werr := pending.wait(); werr != nil {
			return nil, werr
		}
	}
	return next, err
}

// writeLocked is write with the key's slot locked.
func (s *Store) writeLocked(key string, sl *slot, change func(cur *entry) (*entry, error)) (*entry, error) {
	cur, _ := s.latest(key, sl)
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

// install makes next the newest version of the slot and commits the
// change. why says what a nil next means. The slot must be locked.
func (s *Store) install(key string, sl *slot, cur, next *entry, why reason) {
	if next == nil && cur == nil {
		return // deleting what is missing changes nothing
	}
	if s.journal == nil {
		sl.cur.Store(next) // with -data, reveal does, once it is written
	}
	if cur != nil && cur.ttl != nil {
		s.expiry.remove(cur.ttl)
	}
	if next != nil && next.ttl != nil {
		s.expiry.add(next.ttl) // if it fires now, expire waits for the slot
	}
	s.liveBytes.Add(size(key, next) - size(key, cur))
	c := change{key: key, e: next, why: changed, sl: sl}
	if next == nil {
		s.live.Add(-1)
		c.why = why
		if why == expired {
			s.expiries.Add(1)
		} else {
			s.deletes.Add(1)
		}
	}
	if seq, b := s.commit(c); b != nil {
		// reveal needs the slot locked: it comes after this.
		s.journal.hold(key, sl, next, seq, b)
	}
}

// liveSize returns the bytes of the keys and values held: what the data
// files would hold if compacted now, against which the journal weighs
// its log.
func (s *Store) liveSize() int64 { return s.liveBytes.Load() }

// size is what a version of key weighs in the data files, about.
func size(key string, e *entry) int64 {
	if e == nil {
		return 0
	}
	return int64(len(key) + len(e.value))
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
	if cur, _ := s.latest(d.key, sl); cur != nil && cur != tombstone && cur.ttl == d {
		s.install(d.key, sl, cur, nil, expired)
		s.release(d.key, sl)
	}
}

// slot returns the slot of key, creating it if needed.
func (s *Store) slot(key string) *slot {
	if v, ok := s.keys.Load(key); ok {
		return v.(*slot)
	}
	v, _ := s.keys.LoadOrStore(key, &slot{key: key})
	return v.(*slot)
}

// release removes an empty slot from the map, unless a change of it is
// still to be written (the flusher releases it then). The slot must be
// locked.
func (s *Store) release(key string, sl *slot) {
	if sl.cur.Load() != nil {
		return
	}
	if _, pending := s.latest(key, sl); pending != nil {
		return
	}
	sl.cur.Store(tombstone)
	s.keys.CompareAndDelete(key, sl)
}

// Recovery (-data): the data files put back what they hold through
// startSequence, restore and restoreChange, then attach.

// startSequence makes seq the number of the last change: the next is seq+1.
func (s *Store) startSequence(seq int64) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	s.seq = seq
	s.history.reset(seq + 1)
	s.published.Store(seq)
}

// restore puts a version of key in place as recovery finds it, without
// a change: nothing is published or written. e nil removes the key. Its
// deadline, expires (Unix ns, 0: none), is absolute, so a key that
// expired while the server was down stays gone.
func (s *Store) restore(key string, e *entry, expires int64) {
	if e != nil && expires != 0 {
		if expires <= s.now() {
			e = nil
		} else {
			e.ttl = &deadline{at: expires, key: key, index: -1}
		}
	}
	sl := s.lock(key)
	defer sl.mu.Unlock()
	cur := sl.cur.Load()
	sl.cur.Store(e)
	s.liveBytes.Add(size(key, e) - size(key, cur))
	switch {
	case cur == nil && e != nil:
		s.live.Add(1)
	case cur != nil && e == nil:
		s.live.Add(-1)
	}
	s.release(key, sl)
}

// restoreChange restores a change as recovery replays it: the key's
// version, and the change's place in the sequence, which goes on after
// it.
func (s *Store) restoreChange(c change, expires int64) {
	s.restore(c.key, c.e, expires)
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	s.seq = c.seq
	s.history.add(c.key)
}

// attach makes j the journal of every change from now on, once recovery
// has restored what it holds; and schedules the deadlines, only now: an
// expiry during recovery would have taken a change number in the middle
// of the replay.
func (s *Store) attach(j journal) {
	s.seqMu.Lock()
	s.journal = j
	s.published.Store(s.seq)
	s.seqMu.Unlock()
	s.keys.Range(func(_, v any) bool {
		if e := v.(*slot).load(); e != nil && e.ttl != nil {
			s.expiry.add(e.ttl)
		}
		return true
	})
}

// walk calls fn with every key that holds a value and its version, as
// readers see them: with -data, versions in the data files. A snapshot
// is written from it. Range is not a snapshot, which the data files
// allow for (see dataDir.compact).
func (s *Store) walk(fn func(key string, e *entry)) {
	now := s.now()
	s.keys.Range(func(k, v any) bool {
		if e := v.(*slot).load(); e != nil && (e.ttl == nil || e.ttl.at > now) {
			fn(k.(string), e)
		}
		return true
	})
}

// reveal makes a change the journal has written visible: its version
// becomes the slot's cur, which readers see, and it is published; and so
// are the earlier changes of its key written with it, which it
// supersedes. The key is locked meanwhile, so that a subscription
// reading the key's state sees it either before (and gets the change
// after) or after.
func (s *Store) reveal(c change) {
	sl := c.sl
	sl.mu.Lock()
	defer sl.mu.Unlock()
	sl.cur.Store(c.e)
	s.journal.written(c)
	s.release(c.key, sl)
	s.seqMu.Lock()
	s.publish(c)
	s.published.Store(c.seq)
	s.seqMu.Unlock()
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
		if covers(prefix, key) {
			if e := s.unexpired(v.(*slot).load()); e != nil {
				items = append(items, item{key, e})
			}
		}
		return true
	})
	sort.Slice(items, func(i, j int) bool { return items[i].key < items[j].key })
	return items
}

// Len returns the number of keys that hold a value.
func (s *Store) Len() int64 { return s.live.Load() }
