// The store: keys, their versions and revisions, and the one way they
// change, a transaction (a single write is a transaction of one op).
//
// Every change goes through the store's journal (journal.go), which
// decides it, numbers it, keeps it where the mode keeps changes (nowhere,
// the -data log, etcd) and then has the store apply it (apply): the same
// code in every mode, and the code that replays the log at start and
// feeds a node from its etcd watch.

package main

import (
	"cmp"
	"errors"
	"math/rand/v2"
	"slices"
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
// A slot whose key is deleted is removed from the map and the index and
// its cur set to the tombstone. A writer that raced the delete and still
// holds the old slot sees the tombstone and starts again with a fresh
// slot, so no write can land in a slot that is no longer reachable. (A
// tombstone rather than a flag keeps the slot at 32 bytes: this is paid
// once per key.)
type slot struct {
	mu  sync.Mutex
	cur atomic.Pointer[entry] // nil or tombstone while the key is missing
	key string                // the map's own string, which the history and the index share
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

// revisionOf is the revision of a version as GET reports it: noRevision
// for a missing key.
func revisionOf(e *entry) int64 {
	if e == nil {
		return noRevision
	}
	return e.revision
}

// next is the revision the next write of a key at version e gets.
func (e *entry) next() int64 { return revisionOf(e) + 1 }

// Errors of the store. Handlers map them to status codes (outcome.go).
var (
	errConflict = errors.New("revision mismatch")
	errFull     = errors.New("store is full")
)

// conflictError is a transaction whose checks failed: every failed
// check's key at its current version (nil if missing), so the caller can
// answer with them, and which check each is (its index in txn.checks).
type conflictError struct {
	conflicts []item
	at        []int
}

func (e *conflictError) Error() string { return errConflict.Error() }
func (e *conflictError) Unwrap() error { return errConflict }

// cur is the current version of the first failed check's key: for a
// single write, its key's.
func (e *conflictError) cur() *entry { return e.conflicts[0].entry }

// An op is one thing a transaction does to one key: set it (to value,
// with ttl) or delete it.
type op struct {
	key   string
	del   bool
	value string        // of a set: compact JSON
	ttl   time.Duration // of a set: 0 for none (or -default-ttl)
}

// A check is a condition of a transaction: key is at revision, as GET
// reports it (noRevision: missing).
type check struct {
	key      string
	revision int64
}

// txn is a write: every op, applied as one change if every check holds.
// Each key appears at most once among the ops (the API checks it). It
// holds what it did once committed.
type txn struct {
	checks []check
	ops    []op

	// What it did, once committed: the change's number (if it changed
	// nothing, the last change's); of each op, the version it wrote (nil
	// for a delete) and whether its key held a value before.
	seq      int64
	versions []*entry
	existed  []bool

	// Room for a single write's op, check and what deciding it needs, so
	// that it allocates once (see single).
	one struct {
		op      [1]op
		check   [1]check
		slot    [1]*slot
		change  [1]change
		version [1]*entry
		existed [1]bool
	}
}

// singles holds the transactions of single writes for reuse: a write
// would otherwise allocate one (288 bytes) beside its version, which
// doubled what BenchmarkStoreSet spends. Nothing keeps a transaction once
// Commit has returned (the journals copy its changes, events are values),
// so Set, CompareAndSwap and Delete give theirs back (done).
var singles = sync.Pool{New: func() any { return new(txn) }}

// single returns the transaction of a single write: op o, if check is
// not nil only if it holds. The caller gives it back with done once it
// has read the outcome.
func single(o op, check *check) *txn {
	t := singles.Get().(*txn)
	t.one.op[0] = o
	t.ops = t.one.op[:]
	if check != nil {
		t.one.check[0] = *check
		t.checks = t.one.check[:]
	}
	return t
}

// done gives back the transaction of a single write for reuse, cleared,
// so that the pool holds no key or value.
func (t *txn) done() {
	*t = txn{}
	singles.Put(t)
}

// item is a key with its version, as listings return it.
type item struct {
	key string
	*entry
}

// Store is the in-memory key-value store: keys, their current versions,
// their order, the change sequence, and the hook through which every
// change is published.
type Store struct {
	keys     sync.Map     // key string -> *slot
	order    index        // the same slots, in key order: listings and states
	live     atomic.Int64 // keys that currently hold a value
	creating atomic.Int64 // keys a transaction in progress will create, for -max-keys
	maxKeys  int64        // 0: unlimited

	defaultTTL time.Duration
	clock      clock
	expiry     *expiry

	// seqMu orders every change: it is held while a change is numbered
	// (in memory and with -data), applied, remembered and published, so
	// that changes reach every queue in sequence order. It is held with
	// the change's keys locked, so a key's changes are also in revision
	// order.
	seqMu     sync.Mutex
	seq       int64        // the last change's number; guarded by seqMu
	history   history      // guarded by seqMu
	published atomic.Int64 // every change numbered up to it is applied and published
	snaps     snapshots    // listings and states in progress, and what they need
	// applying is set while a transaction's versions are being made
	// current, one key after another: a read that finds it set waits for
	// the transaction to be whole (see Get).
	applying atomic.Bool

	// publish is called for every change applied, with its keys' slots
	// and seqMu locked. It must not block. It is subs.publish; tests may
	// watch changes through it instead.
	publish func(change)
	subs    registry

	// journal decides, numbers and keeps every change (journal.go).
	journal journal

	deletes, expiries atomic.Int64 // keys deleted and expired, for /metrics
	liveBytes         atomic.Int64 // bytes of the keys and values held, for compaction
}

// NewStore returns an empty store in memory that holds at most maxKeys
// keys (0: no limit) and expires keys by clk (nil: the real clock).
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
	s.expiry = &expiry{clock: clk, expire: func(d *deadline) { s.journal.expire(d) }}
	s.history.max = defaultHistory
	s.journal = memJournal{s}
	s.startSequence((1 + rand.Int64N(1<<20)) << 32)
	return s
}

// Get returns the current version of key, or nil if it is missing or
// expired. It checks the deadline itself: the timer may not have run yet.
//
// A transaction's keys become current one after another. A read that
// saw one of them, and then a read of another that began after it, must
// see that one too: so a read that finds a transaction being applied
// waits for it (seqMu, which apply holds). Otherwise it costs one atomic
// load.
func (s *Store) Get(key string) *entry {
	if s.applying.Load() {
		s.seqMu.Lock()
		s.seqMu.Unlock() // nothing to do inside: waiting for apply is the point
	}
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

// Commit applies t if its checks hold: every op as one change, with one
// number. On a failed check it returns a *conflictError and changes
// nothing. When it returns, the change is applied on this server (and
// with -data written, with -etcd committed).
func (s *Store) Commit(t *txn) error { return s.journal.commit(t) }

// Set stores value under key unconditionally and returns the new version.
// A ttl of 0 makes the key permanent (or gives it the default TTL).
func (s *Store) Set(key, value string, ttl time.Duration) (*entry, error) {
	t := single(op{key: key, value: value, ttl: ttl}, nil)
	defer t.done()
	if err := s.Commit(t); err != nil {
		return nil, err
	}
	return t.versions[0], nil
}

// CompareAndSwap stores value under key only if the write would give it
// revision rev: the current revision is rev-1, or the key is missing and
// rev is 0. On a mismatch it returns a *conflictError holding the current
// version.
func (s *Store) CompareAndSwap(key, value string, rev int64, ttl time.Duration) (*entry, error) {
	t := single(op{key: key, value: value, ttl: ttl}, &check{key, rev - 1})
	defer t.done()
	if err := s.Commit(t); err != nil {
		return nil, err
	}
	return t.versions[0], nil
}

// Delete removes key and reports whether it held a value. With rev >= 0
// it removes it only if its current revision is rev, and otherwise returns
// a *conflictError. Deleting a missing key without a revision is not an
// error.
func (s *Store) Delete(key string, rev int64) (existed bool, err error) {
	var c *check
	if rev >= 0 {
		c = &check{key, rev}
	}
	t := single(op{key: key, del: true}, c)
	defer t.done()
	if err := s.Commit(t); err != nil {
		return false, err
	}
	return t.existed[0], nil
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

// A change is what a write did to one key: its new version (nil if the
// key is now missing, for the reason why) and its place in the change
// sequence. The changes of one transaction share a number, and each
// holds them all (txn), so that publishing can send them as one.
type change struct {
	key string
	e   *entry
	why reason
	seq int64
	sl  *slot    // the key's slot
	txn []change // a transaction's changes, this one among them; nil for a single one
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

// decide is a transaction as a journal that keeps changes on this server
// (in memory, or the -data log) makes it: the keys are locked in key
// order, each checked against its newest version, and the changes handed
// to the journal, which numbers and keeps them and has them applied
// (keep). It returns once they are applied; with -data, once the key's
// changes, this one or those it saw, are written, so that the answer a
// client gets, a conflict included, tells of nothing a crash could take
// back.
func (s *Store) decide(t *txn, j localJournal) error {
	slots := s.lockAll(t)
	creates, err := s.decideLocked(t, slots, j)
	var waitOne [1]*batch
	wait := waitOne[:0]
	for _, sl := range slots {
		if _, b := s.latest(j, sl); b != nil && !slices.Contains(wait, b) {
			wait = append(wait, b)
		}
		s.release(j, sl)
		sl.mu.Unlock()
	}
	for _, b := range wait {
		if werr := b.wait(); werr != nil {
			err = werr
			break
		}
	}
	// Only now, written and applied, do the keys created count as live:
	// until then they count as being created, against -max-keys.
	if creates != 0 { // most writes create nothing: no shared counter touched
		s.creating.Add(-creates)
	}
	return err
}

// decideLocked is decide with the keys of t locked, slots in key order.
// It returns how many keys it reserved room for in s.creating.
func (s *Store) decideLocked(t *txn, slots []*slot, j localJournal) (creates int64, err error) {
	// A key that expired and whose timer has not run yet expires now,
	// as a change of its own, so subscribers see the expiry before the
	// key starts again at 0.
	for _, sl := range slots {
		if cur, _ := s.latest(j, sl); cur != nil && s.unexpired(cur) == nil {
			j.keep([]change{{key: sl.key, why: expired, sl: sl}})
		}
	}
	var conflict *conflictError
	for i, c := range t.checks {
		sl := findSlot(slots, c.key)
		if cur, _ := s.latest(j, sl); revisionOf(cur) != c.revision {
			if conflict == nil {
				conflict = new(conflictError)
			}
			conflict.conflicts = append(conflict.conflicts, item{sl.key, cur})
			conflict.at = append(conflict.at, i)
		}
	}
	if conflict != nil {
		return 0, conflict
	}
	t.versions, t.existed = t.one.version[:], t.one.existed[:]
	changes := t.one.change[:0]
	if len(t.ops) > 1 {
		t.versions, t.existed = make([]*entry, len(t.ops)), make([]bool, len(t.ops))
		changes = make([]change, 0, len(t.ops))
	}
	for i, o := range t.ops {
		sl := findSlot(slots, o.key)
		cur, _ := s.latest(j, sl)
		t.existed[i] = cur != nil
		switch {
		case o.del && cur == nil:
			continue // deleting what is missing changes nothing
		case o.del:
			changes = append(changes, change{key: sl.key, why: deleted, sl: sl})
			creates--
		default:
			e := s.newEntry(sl.key, o.value, cur.next(), o.ttl)
			t.versions[i] = e
			changes = append(changes, change{key: sl.key, e: e, sl: sl})
			if cur == nil {
				creates++
			}
		}
	}
	creates = max(creates, 0)
	if !s.reserve(creates) {
		return 0, errFull
	}
	if len(changes) == 0 {
		t.seq = s.published.Load()
		return creates, nil
	}
	if len(changes) > 1 {
		for i := range changes {
			changes[i].txn = changes
		}
	}
	t.seq = j.keep(changes)
	return creates, nil
}

// reserve makes room for n keys more, or reports false if the store
// would then hold more than -max-keys.
func (s *Store) reserve(n int64) bool {
	if n == 0 {
		return true
	}
	if c := s.creating.Add(n); s.maxKeys > 0 && s.live.Load()+c > s.maxKeys {
		s.creating.Add(-n)
		return false
	}
	return true
}

// findSlot returns the slot of key among slots, which are in key order.
func findSlot(slots []*slot, key string) *slot {
	i, _ := slices.BinarySearchFunc(slots, key, func(sl *slot, k string) int { return cmp.Compare(sl.key, k) })
	return slots[i]
}

// lockAll locks the slots of every key t names, in key order (so that two
// transactions never wait for each other), and returns them in that
// order.
func (s *Store) lockAll(t *txn) []*slot {
	if len(t.ops) == 1 && (len(t.checks) == 0 || len(t.checks) == 1 && t.checks[0].key == t.ops[0].key) {
		t.one.slot[0] = s.lock(t.ops[0].key)
		return t.one.slot[:]
	}
	keys := make([]string, 0, len(t.checks)+len(t.ops))
	for _, c := range t.checks {
		keys = append(keys, c.key)
	}
	for _, o := range t.ops {
		keys = append(keys, o.key)
	}
	slices.Sort(keys)
	keys = slices.Compact(keys)
	slots := make([]*slot, len(keys))
	for i, k := range keys {
		slots[i] = s.lock(k)
	}
	return slots
}

// localJournal returns the store's journal if it keeps changes on this
// server, else nil.
func (s *Store) localJournal() localJournal {
	j, _ := s.journal.(localJournal)
	return j
}

// latest returns the newest version of a locked slot, the one writes work
// on, and with -data the batch of its change if that is not yet written.
func (s *Store) latest(j localJournal, sl *slot) (*entry, *batch) {
	if e, b, ok := j.pending(sl); ok {
		return e, b
	}
	return sl.load(), nil
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

// slot returns the slot of key, creating it if needed.
func (s *Store) slot(key string) *slot {
	if v, ok := s.keys.Load(key); ok {
		return v.(*slot)
	}
	v, _ := s.keys.LoadOrStore(key, &slot{key: key})
	return v.(*slot)
}

// release removes an empty slot from the map and the index, unless a
// change of it is still to be written (the flusher releases it then).
// The slot must be locked.
func (s *Store) release(j localJournal, sl *slot) {
	if sl.cur.Load() != nil {
		return
	}
	if j != nil {
		if _, _, pending := j.pending(sl); pending {
			return
		}
	}
	sl.cur.Store(tombstone)
	s.order.remove(sl)
	s.keys.CompareAndDelete(sl.key, sl)
}

// apply makes changes, numbered seq, what the store shows: each key's
// new version becomes its current one, the change is remembered and
// published, and every change up to seq counts as published. A
// transaction's changes become visible together: a listing or state
// reading at an earlier point keeps seeing the versions before them
// (snapshots.keep). The changes' slots and seqMu must be locked.
//
// Every mode applies changes here: in memory as they are made, with
// -data once written, with -etcd as the node's watch brings them back,
// and at start-up the log's replay.
func (s *Store) apply(changes []change) {
	if len(changes) > 1 {
		s.snaps.keep(changes)
		s.applying.Store(true)
		defer s.applying.Store(false)
	}
	for i := range changes {
		c := &changes[i]
		c.key = c.sl.key // one string per key, not one per change
		old := c.sl.load()
		s.setCur(c.sl, old, c.e)
		if old != nil && old.ttl != nil {
			s.expiry.remove(old.ttl)
		}
		if c.e != nil && c.e.ttl != nil {
			s.expiry.add(c.e.ttl) // if it fires now, expire waits for the slot
		}
		switch {
		case c.e != nil:
		case c.why == expired:
			s.expiries.Add(1)
		default:
			s.deletes.Add(1)
		}
		s.history.add(c.seq, c.key)
		s.publish(*c)
	}
	s.seq = max(s.seq, changes[0].seq)
	s.published.Store(changes[0].seq)
}

// setCur makes e the current version of the locked slot sl, whose
// current version is old, and keeps the counts and the index in step.
func (s *Store) setCur(sl *slot, old, e *entry) {
	switch {
	case old == nil && e != nil:
		s.order.insert(sl)
		s.live.Add(1)
	case old != nil && e == nil:
		s.live.Add(-1)
	}
	s.liveBytes.Add(size(sl.key, e) - size(sl.key, old))
	sl.cur.Store(e)
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

// expireLocal deletes the key of d, as a journal that keeps changes on
// this server does, if its newest version is still the one d was made
// for: a write that raced the timer replaced the version, and wins.
func (s *Store) expireLocal(d *deadline, j localJournal) {
	v, ok := s.keys.Load(d.key)
	if !ok {
		return
	}
	sl := v.(*slot)
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if cur, _ := s.latest(j, sl); cur != nil && cur != tombstone && cur.ttl == d {
		j.keep([]change{{key: d.key, why: expired, sl: sl}})
		s.release(j, sl)
	}
}

// Recovery (-data) and a node's start (-etcd) put back what the store
// held through startSequence and restore, then replay the changes after
// it, with the expiry scheduler held (expiry.hold) until they are done.

// startSequence makes seq the number of the last change: the next is
// seq+1, and the history starts there.
func (s *Store) startSequence(seq int64) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	s.seq = seq
	s.history.reset(seq + 1)
	s.published.Store(seq)
}

// historyFrom empties the history, to start at change first: a node
// (-etcd) fills it from etcd's history of the changes before its state.
func (s *Store) historyFrom(first int64) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	s.history.reset(first)
}

// remember adds to the history changes the store holds already: a
// node's, from before the state it read at start.
func (s *Store) remember(changes []change) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	for _, c := range changes {
		s.history.add(c.seq, c.key)
	}
}

// advance records that every change up to seq is applied (a node's view
// learns it from etcd's progress), so that a listing or a subscription
// may say so.
func (s *Store) advance(seq int64) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	if seq > s.published.Load() {
		s.seq = seq
		s.published.Store(seq)
	}
}

// restore puts a version of key in place as recovery finds it, without
// a change: nothing is published or remembered. e nil removes the key.
// Its deadline, expires (Unix ns, 0: none, or e's own), is absolute, so
// a key that expired while the server was down stays gone.
func (s *Store) restore(key string, e *entry, expires int64) {
	if e != nil && expires != 0 {
		if expires <= s.now() {
			e = nil
		} else if e.ttl == nil {
			e.ttl = &deadline{at: expires, key: key, index: -1}
		}
	}
	sl := s.lock(key)
	defer sl.mu.Unlock()
	old := sl.load()
	if old != nil && old.ttl != nil {
		s.expiry.remove(old.ttl)
	}
	if e != nil && e.ttl != nil {
		s.expiry.add(e.ttl) // held while the store loads
	}
	s.setCur(sl, old, e)
	s.release(nil, sl)
}

// replay applies changes as the log or etcd tells them: numbered
// already, one key's or a transaction's, which share a number.
func (s *Store) replay(changes []change) {
	slices.SortFunc(changes, func(a, b change) int { return cmp.Compare(a.key, b.key) })
	for i := range changes {
		changes[i].sl = s.lock(changes[i].key)
		if len(changes) > 1 {
			changes[i].txn = changes
		}
	}
	s.seqMu.Lock()
	s.apply(changes)
	s.seqMu.Unlock()
	for _, c := range changes {
		s.release(nil, c.sl)
		c.sl.mu.Unlock()
	}
}

// walk calls fn with every key that holds a value and its version, as
// readers see them (with -data, versions in the data files), in key
// order: it reads the index a chunk at a time. A snapshot of the data
// files is written from it, so a snapshot is in key order, and loading
// it inserts each key at the index's right edge (index search), twice as
// fast as in the map's order. The walk is not a snapshot, which the data
// files allow for (see dataDir.compact).
func (s *Store) walk(fn func(key string, e *entry)) {
	now := s.now()
	var buf [stateChunk]*slot
	for from := ""; ; {
		slots := s.order.read(buf[:0], from, "", len(buf))
		for _, sl := range slots {
			if e := sl.load(); e != nil && (e.ttl == nil || e.ttl.at > now) {
				fn(sl.key, e)
			}
		}
		if len(slots) < len(buf) {
			return
		}
		from = slots[len(slots)-1].key + "\x00" // the smallest key after it
	}
}

// Len returns the number of keys that hold a value.
func (s *Store) Len() int64 { return s.live.Load() }
