// The change sequence (SPEC section 4a): every change of the store is
// numbered, remembered for a while, and published to the subscriptions
// that watch its key, in that order; a subscription starts live, with the
// current state, or where a client left off.

package main

import (
	"iter"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
)

// keepHistory makes the store remember at least the last n changes, from
// the next one on.
func (s *Store) keepHistory(n int) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	s.history.max = n
	s.history.reset(s.seq + 1)
}

// subscription is one registration of a queue on a path: an event
// stream's only one, or one of a WebSocket's several. Its events go to q
// marked with it, so one queue can tell its subscriptions' events apart.
type subscription struct {
	path     string      // a key, a prefix ending with "/", or "/"
	q        *coalescer  // where its events go
	kvserver bool        // its client names keys without the leading "/"
	ended    atomic.Bool // unsubscribed: a state in progress stops

	// Set by the writer of q's events, when a state starts and when it
	// is whole; only that writer touches them.
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

// Subscribe registers sub for the changes of its path, unless it is
// registered already, and queues what it must know first, as from says:
//
//   - fromNow: nothing;
//   - fromScratch: the current state of what it watches (a key's version
//     or its absence, or every existing key under a prefix, in key
//     order), then synced;
//   - a change number S: the current state of each watched key that
//     changed after S, in key order, a missing key as missing, then
//     synced; or, if S is older than the history, newer than what is
//     published, or another run's, a reset and the whole state, then
//     synced;
//   - fromUnknown: a reset and the whole state, then synced.
//
// It returns the subscription's starting point, a safe resume point
// before anything it will send: its floor, or for a live subscription
// the last change published before it was registered.
//
// The state is not copied: what is queued is a stateCursor, a few hundred
// bytes whatever the path holds, that the writer reads from the store as
// the connection drains (SPEC 10). It is queued with the registration,
// under seqMu, and reads the store as of that moment (a snapshot: no
// transaction published after it shows in part): a change published
// before is in the state, a later one is queued after the cursor. When
// the cursor reads a key at its current version, a change of it pending
// behind the cursor gives way to the state, which is as new; so no
// change falls between the state and the live events, and a key's
// revisions only go up. A subscription registered already (a client
// subscribing again) gets the new state after what was queued for it
// before.
//
// Until its synced, everything the subscription sends is tagged with its
// floor, a resume point that is safe wherever the state is cut: S itself
// if S can never be taken for a newer point than it is, else 0, which
// resets.
//
// ack, if not nil, is a reply queued with the registration, before
// anything of the subscription (the WebSocket's ok, or an empty reply
// that only marks the place): once it is queued,
// and so once a client may have read it, every change published reaches
// sub. Queued before the registration, outside seqMu, it left a window in
// which a client that had the ok wrote the key and was never told.
func (s *Store) Subscribe(sub *subscription, from int64, ack *wsReply) (start int64) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	// Every change up to before is published; every later one will find
	// sub registered, and be queued after the ack and the cursor.
	before := s.published.Load()
	s.subs.add(sub)
	if ack != nil {
		// Once it is written, every change up to before has been written
		// for every subscription of the queue: before is a resume point
		// of the whole connection (what a transaction's first events
		// carry on a connection that has sent nothing else).
		ack.start = before
		sub.q.push(event{kind: evReply, reply: ack})
	}
	if from == fromNow {
		return before
	}
	c := &stateCursor{s: s, sub: sub, upTo: before, reset: true, sn: s.snaps.open(before)}
	if from > 0 && from <= before {
		c.floor = from
		if from >= s.history.first-1 {
			c.since, c.reset = from, false
		}
	}
	if from == fromScratch {
		c.reset = false
	}
	sub.q.push(event{sub: sub, kind: evCursor, state: c})
	return c.floor
}

// stateCursor is a subscription's initial or resumed state, in progress:
// the keys it has still to send, in key order. Only the writer that has
// the subscription's queue reads it.
type stateCursor struct {
	s     *Store
	sub   *subscription
	floor int64     // see Subscribe
	upTo  int64     // every change up to it is published: synced says so
	reset bool      // a reset goes first
	since int64     // > 0: the keys changed after since; else the whole state
	sn    *snapshot // the point it reads the store at: upTo

	mu      sync.Mutex // of close, which the stream's end may call
	started bool
	keys    []string // since: the keys to send, in key order, and what they count against the bound
	held    int64
	from    string // the whole state of a prefix: the next key to read
	closed  bool
}

// sinceMax is the most keys a resumed state sends key by key: a resume
// past more keys changed than that (a quarter of the connection's bound,
// at seenWeight a key) is sent as a reset and the whole state, which is
// then about as long and costs no list of keys.
const (
	seenWeight = 64
	sinceMax   = (1 << 20) / seenWeight
)

// stateChunk is the most key states a cursor reads at a time: each read
// is short, and the next comes once the connection has taken this one.
const stateChunk = 256

// read appends the next states of the cursor to out, each read with its
// key locked; and, once the state is whole, synced, and reports done. A
// subscription that ended, a cursor that a newer one replaced, or one
// whose stream closed, stops there, done, without synced.
func (c *stateCursor) read(out []event) (_ []event, done bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sub := c.sub
	if c.closed || sub.ended.Load() || sub.q.stops(c) {
		c.close()
		return out, true
	}
	if !c.started {
		c.started = true
		sub.floor, sub.syncing = c.floor, true
		if c.reset {
			out = append(out, event{sub: sub, kind: evReset})
		}
		c.from = sub.path
		if c.since > 0 && !c.collect() {
			// Too many keys changed, or the history moved on before the
			// state began: a reset and the whole state.
			c.since, c.reset = 0, true
			out = append(out, event{sub: sub, kind: evReset})
		}
	}
	if c.sn.lost.Load() {
		// The store changed too much while the client read slowly to
		// keep what this point shows: from here on it is a reset and
		// the whole state, as of now.
		c.restart()
		out = append(out, event{sub: sub, kind: evReset})
	}
	if more := c.next(&out); more {
		return out, false
	}
	c.close()
	return append(out, event{sub: sub, kind: evSynced, seq: c.upTo}), true
}

// restart makes the cursor the whole state as of the last change
// published. c.mu must be held.
func (c *stateCursor) restart() {
	s := c.s
	s.seqMu.Lock()
	c.upTo = s.published.Load()
	sn := s.snaps.open(c.upTo)
	s.seqMu.Unlock()
	s.closeSnapshot(c.sn)
	c.sn = sn
	c.since, c.from = 0, c.sub.path
	c.forget()
	c.floor, c.sub.floor = 0, 0
}

// collect lists the watched keys that changed after since, up to upTo,
// from the history, in key order. It reports false if the history no
// longer holds them all, or if they are more than sinceMax.
func (c *stateCursor) collect() bool {
	s := c.s
	s.seqMu.Lock()
	h := s.history.view()
	s.seqMu.Unlock()
	if c.since < h.first-1 {
		return false
	}
	seen := make(map[string]struct{})
	ok := h.each(c.since+1, c.upTo, func(key string) bool {
		if covers(c.sub.path, key) {
			seen[key] = struct{}{}
		}
		return len(seen) <= sinceMax
	})
	if !ok {
		return false
	}
	c.keys = make([]string, 0, len(seen))
	for k := range seen {
		c.keys = append(c.keys, k)
	}
	sort.Strings(c.keys)
	// Counted against the connection's bound (SPEC 10).
	c.held = int64(len(c.keys)) * seenWeight
	c.sub.q.size.Add(c.held)
	return true
}

// next appends the states of the next keys, and reports whether there
// are more.
func (c *stateCursor) next(out *[]event) (more bool) {
	s, path := c.s, c.sub.path
	switch {
	case c.since > 0:
		n, weight := 0, 0
		for _, key := range c.keys[:min(len(c.keys), stateChunk)] {
			sl := s.lock(key)
			*out = c.state(*out, key, sl, true)
			s.release(s.localJournal(), sl)
			sl.mu.Unlock()
			n++
			if weight += stateWeight(*out); weight >= chunkBytes {
				break
			}
		}
		c.keys = c.keys[n:]
		return len(c.keys) > 0
	case !strings.HasSuffix(path, "/"):
		sl := s.lock(path)
		*out = c.state(*out, path, sl, true)
		s.release(s.localJournal(), sl)
		sl.mu.Unlock()
		return false
	}
	var buf [stateChunk]rangeItem
	items, hi := s.readRange(c.sn, buf[:0], c.from, prefixEnd(path), stateChunk)
	weight := 0
	for _, it := range items {
		*out = c.item(*out, it)
		if weight += stateWeight(*out); weight >= chunkBytes {
			c.from = it.key + "\x00" // the rest of the range, next time
			return true
		}
	}
	c.from = hi
	return hi != ""
}

// item appends the state of a key of the whole state, as readRange read
// it from the index.
func (c *stateCursor) item(out []event, it rangeItem) []event {
	s := c.s
	if it.sl == nil { // deleted after the cursor's point: its change follows
		if e := s.unexpired(it.e); e != nil {
			out = append(out, event{sub: c.sub, kind: evState, key: it.key, e: e})
		}
		return out
	}
	it.sl.mu.Lock()
	if it.sl.cur.Load() != tombstone {
		out = c.state(out, it.key, it.sl, false)
		it.sl.mu.Unlock()
		return out
	}
	// Deleted since the index was read, and perhaps written again, in a
	// slot of its own: its state is that slot's. (The dead slot's is
	// missing, and would drop the pending change that wrote the key
	// again: TestStateOfDeadSlot, TestResumeAtRandomCuts.)
	it.sl.mu.Unlock()
	sl := s.lock(it.key)
	out = c.state(out, it.key, sl, false)
	s.release(s.localJournal(), sl)
	sl.mu.Unlock()
	return out
}

// stateWeight is what the last state of out weighs, about: its key and
// value (0 if out is empty).
func stateWeight(out []event) int {
	if len(out) == 0 {
		return 0
	}
	ev := &out[len(out)-1]
	if ev.e == nil {
		return len(ev.key)
	}
	return len(ev.key) + len(ev.e.value)
}

// state appends the state of key, whose slot is locked, as the cursor's
// point sees it; a missing key only if evenMissing. If that is the key's
// current version, its changes pending in the queue give way to it: they
// are older or the same; if the point sees an older one (a transaction
// after it changed the key), they follow it.
func (c *stateCursor) state(out []event, key string, sl *slot, evenMissing bool) []event {
	cur := sl.load()
	e := c.s.snaps.at(c.sn, key, cur)
	if e == cur {
		c.sub.q.drop(c.sub, key)
	}
	e = c.s.unexpired(e)
	if e == nil && !evenMissing {
		return out
	}
	return append(out, event{sub: c.sub, kind: evState, key: key, e: e})
}

// close ends the cursor: its snapshot and its list of keys go. c.mu
// must be held.
func (c *stateCursor) close() {
	if !c.closed {
		c.closed = true
		c.s.closeSnapshot(c.sn)
	}
	c.forget()
}

// forget drops the list of keys to send, and its weight. c.mu must be
// held.
func (c *stateCursor) forget() {
	c.keys = nil
	c.sub.q.size.Add(-c.held)
	c.held = 0
}

// drop lets go of the snapshot of a cursor that never began.
func (c *stateCursor) drop() { c.s.closeSnapshot(c.sn) }

// stopWalk ends the cursor from outside the writer: the stream closed.
func (c *stateCursor) stopWalk() {
	c.mu.Lock()
	c.close()
	c.mu.Unlock()
}

// defaultHistory is how many changes the store remembers (-history).
const defaultHistory = 100_000

// historyChunk is the most changes a chunk of the history holds; a small
// history has smaller chunks, so that it keeps about what it was asked.
const historyChunk = 4096

// history remembers the key of each recent change and its number, in
// sequence order: every change numbered first or later is in it. In
// memory and with -data the numbers follow one another, but with -etcd
// they are etcd's revisions, which other keys of etcd take too, and a
// transaction's changes share one. It is a list of fixed-size chunks,
// appended to and dropped whole, never rewritten, so that a reader can
// scan what it saw without holding seqMu. It costs 24 bytes a change:
// the key's string is the store's slot's, the same for every change of
// the key while it exists (a key deleted and written again has a new
// one); never the value.
type history struct {
	chunks [][]histEntry // each h.chunk long when full; oldest first
	first  int64         // every change numbered first or later is here
	max    int           // at least this many changes are kept
	chunk  int           // the length of a full chunk
}

type histEntry struct {
	seq int64
	key string
}

// reset empties the history, from change first on, and sizes its chunks
// for max: a quarter of it, from 64 to historyChunk.
func (h *history) reset(first int64) {
	h.chunks = nil
	h.first = first
	h.chunk = min(max(h.max/4, 64), historyChunk)
}

// add remembers the key of a change, numbered seq: the newest.
func (h *history) add(seq int64, key string) {
	n := len(h.chunks)
	if n == 0 || len(h.chunks[n-1]) == h.chunk {
		if n > 0 && (n-1)*h.chunk >= h.max {
			// The chunks after the first hold max changes already: the
			// history now starts after the first chunk's last change.
			h.first = h.chunks[0][h.chunk-1].seq + 1
			h.chunks[0] = nil // the array keeps its front: let the chunk go
			h.chunks = h.chunks[1:]
		}
		h.chunks = append(h.chunks, make([]histEntry, 0, h.chunk))
		n = len(h.chunks)
	}
	h.chunks[n-1] = append(h.chunks[n-1], histEntry{seq, key})
}

// view returns what a reader may scan without seqMu: the chunks as they
// are now (full ones never change; the last only grows past what the
// copy's length shows). seqMu must be held.
func (h *history) view() history {
	v := *h
	v.chunks = slices.Clone(h.chunks)
	if n := len(v.chunks); n > 0 {
		v.chunks[n-1] = v.chunks[n-1][:len(v.chunks[n-1]):len(v.chunks[n-1])]
	}
	return v
}

// each calls fn with the key of every change numbered from..upTo, in
// order, while fn returns true; it reports whether it went to the end.
func (h *history) each(from, upTo int64, fn func(key string) bool) bool {
	// The first chunk that may hold from: the last whose first is <= from.
	i := sort.Search(len(h.chunks), func(i int) bool { return h.chunks[i][0].seq > from })
	i = max(i-1, 0)
	for ; i < len(h.chunks); i++ {
		for _, e := range h.chunks[i] {
			switch {
			case e.seq < from:
				continue
			case e.seq > upTo:
				return true
			case !fn(e.key):
				return false
			}
		}
	}
	return true
}

// registry maps each watched path to its subscriptions. The store's seqMu
// guards it: publishing holds it anyway, and registrations are few beside
// changes.
type registry struct {
	paths map[string]map[*subscription]struct{}
	count atomic.Int64 // registrations, so that publishing to nobody costs one load

	// A transaction's events, gathered to mark its last on each queue.
	txnEvents []event
	last      map[*coalescer]bool
}

func (r *registry) add(sub *subscription) {
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

// Unsubscribe removes the registration of sub, and stops its state if
// one is in progress.
func (s *Store) Unsubscribe(sub *subscription) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	sub.ended.Store(true)
	s.subs.remove(sub)
}

func (r *registry) remove(sub *subscription) {
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
//
// A transaction's changes go to each queue one after another, all its
// events but the last on that queue joined to the next (SPEC 11: no
// resume point inside a transaction). publish does them all when called
// with the first, and nothing for the others.
func (r *registry) publish(c change) {
	if r.count.Load() == 0 {
		return
	}
	if c.txn == nil {
		ev := event{kind: evChange, key: c.key, e: c.e, why: c.why, seq: c.seq}
		for sub := range r.each(c.key) {
			ev.sub = sub
			sub.q.push(ev)
		}
		return
	}
	if c.sl != c.txn[0].sl {
		return // published with the first
	}
	evs := r.txnEvents[:0]
	for _, c := range c.txn {
		ev := event{kind: evChange, key: c.sl.key, e: c.e, why: c.why, seq: c.seq}
		for sub := range r.each(ev.key) {
			ev.sub = sub
			evs = append(evs, ev)
		}
	}
	if r.last == nil {
		r.last = make(map[*coalescer]bool)
	}
	for i := len(evs) - 1; i >= 0; i-- {
		q := evs[i].sub.q
		evs[i].joined = r.last[q]
		r.last[q] = true
	}
	clear(r.last)
	for i := range evs {
		evs[i].sub.q.push(evs[i])
	}
	clear(evs)
	r.txnEvents = evs[:0]
}

// each yields every subscription that sees key's changes.
func (r *registry) each(key string) iter.Seq[*subscription] {
	return func(yield func(*subscription) bool) {
		for path := range coveringPaths(key) {
			for sub := range r.paths[path] {
				if !yield(sub) {
					return
				}
			}
		}
	}
}
