// The change sequence (SPEC section 4a): every change of the store is
// numbered, remembered for a while, and published to the subscriptions
// that watch its key, in that order; a subscription starts live, with the
// current state, or where a client left off.

package main

import (
	"iter"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

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

// change is one change of a key as it is published: the new version (nil
// if the key is now missing, for the reason why) and its place in the
// change sequence.
type change struct {
	key string
	e   *entry
	why reason
	seq int64
	sl  *slot // the key's slot, for the flusher (-data)
}

// keepHistory makes the store remember at least the last n changes, from
// the next one on.
func (s *Store) keepHistory(n int) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	s.history.max = n
	s.history.reset(s.seq + 1)
}

// commit numbers a change, remembers it and publishes it; or, with
// -data, queues it for the flusher, which publishes it once it is
// written, and returns the batch it went in. The key's slot must be
// locked.
func (s *Store) commit(c change) (seq int64, b *batch) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	s.seq++
	c.seq = s.seq
	if c.sl != nil {
		c.key = c.sl.key // one string per key, not one per change
	}
	s.history.add(c.key)
	if s.journal != nil {
		return c.seq, s.journal.queue(c)
	}
	s.publish(c)
	s.published.Store(c.seq)
	return c.seq, nil
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
//     or its absence, or every existing key under a prefix), then synced;
//   - a change number S: the current state of each watched key that
//     changed after S, a missing key as missing, then synced; or, if S is
//     older than the history, newer than what is published, or another
//     run's, a reset and the whole state, then synced;
//   - fromUnknown: a reset and the whole state, then synced.
//
// It returns the subscription's starting point, a safe resume point
// before anything it will send: its floor, or for a live subscription
// the last change published before it was registered.
//
// The state is not copied: what is queued is a stateCursor, a few hundred
// bytes whatever the path holds, that the writer reads from the store as
// the connection drains (SPEC 10). It is queued with the registration,
// under seqMu: a change published before is queued before it, a later one
// after it. When the cursor reads a key, a change of it pending behind
// the cursor gives way to the state, which is as new; so no change falls
// between the state and the live events, and a key's revisions only go
// up. A subscription registered already (a client subscribing again)
// gets the new state after what was queued for it before.
//
// Until its synced, everything the subscription sends is tagged with its
// floor, a resume point that is safe wherever the state is cut: S itself
// if S can never be taken for a newer point than it is, else 0, which
// resets.
//
// ack, if not nil, is a reply queued with the registration, before
// anything of the subscription (the WebSocket's ok): once it is queued,
// and so once a client may have read it, every change published reaches
// sub. Queued before the registration, outside seqMu, it left a window in
// which a client that had the ok wrote the key and was never told.
func (s *Store) Subscribe(sub *subscription, from int64, ack *wsReply) (start int64) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	if ack != nil {
		sub.q.push(event{kind: evReply, reply: ack})
	}
	// Every change up to before is published; every later one will find
	// sub registered, and be queued after the ack and the cursor.
	before := s.published.Load()
	s.subs.add(sub)
	if from == fromNow {
		return before
	}
	c := &stateCursor{s: s, sub: sub, upTo: before, reset: true}
	if from > 0 && from <= before {
		c.floor = from
		if from >= s.history.first-1 {
			c.since, c.pos, c.reset = from, from+1, false
		}
	}
	if from == fromScratch {
		c.reset = false
	}
	sub.q.push(event{sub: sub, kind: evCursor, state: c})
	return c.floor
}

// stateCursor is a subscription's initial or resumed state, in progress:
// where it stands in the keys of its path, or in the history. Only the
// writer that has the subscription's queue reads it.
type stateCursor struct {
	s     *Store
	sub   *subscription
	floor int64 // see Subscribe
	upTo  int64 // every change up to it is published: synced says so
	reset bool  // a reset goes first
	since int64 // > 0: the keys changed after since, from the history; else the whole state

	mu      sync.Mutex // of the walk, which close may stop
	started bool
	pos     int64               // the history: the next change to look at
	seen    map[string]struct{} // the history: keys already sent
	held    int64               // seen's weight, counted in the queue's size
	next    func() (string, *slot, bool)
	stop    func()
}

// seenWeight is what a key in a cursor's seen set counts against the
// connection's bound: the map's slot for its string header (the bytes are
// the history's), with the map's spare room. BenchmarkResumeSeen measures
// 57 B a key at 16,000 keys (a map's tables, in their size classes, reach
// 58 B at some sizes). seenMax is the most a set may count, a quarter of
// the default bound: past it the set starts again, empty, so a key sent
// before may be sent again, with its current state, if it changed again
// later in the history. A resend is safe (it is as new as the key's
// pending change, which it replaces, and its revision never goes down);
// only resumes over more than 16,384 distinct keys meet it.
const (
	seenWeight = 64
	seenMax    = 1 << 20
)

// stateChunk is the most key states a cursor reads at a time, and
// stateScan the most keys it looks at for them: each read is short, and
// the next comes once the connection has taken this one.
const (
	stateChunk = 256
	stateScan  = 4096
)

// read appends the next states of the cursor to out, each read with its
// key locked; and, once the state is whole, synced, and reports done. A
// subscription that ended, a cursor that a newer one replaced, or one
// whose stream closed, stops there, done, without synced.
func (c *stateCursor) read(out []event) (_ []event, done bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	sub := c.sub
	if sub.ended.Load() || sub.q.stops(c) {
		c.close()
		return out, true
	}
	if !c.started {
		c.started = true
		sub.floor, sub.syncing = c.floor, true
		if c.reset {
			out = append(out, event{sub: sub, kind: evReset})
		}
	}
	if c.since > 0 {
		var ok bool
		if out, ok = c.changed(out); !ok {
			// The history moved past the cursor while the client read
			// slowly: from here on it is a reset and the whole state.
			c.since, c.reset = 0, true
			out = append(out, event{sub: sub, kind: evReset})
		} else if c.pos <= c.upTo {
			return out, false
		}
	}
	if c.since == 0 {
		if more := c.walk(&out); more {
			return out, false
		}
	}
	c.close()
	return append(out, event{sub: sub, kind: evSynced, seq: c.upTo}), true
}

// changed appends the states of the watched keys of the next changes in
// the history, each key once, a missing one as missing. It reports false
// if the history no longer holds the next change.
func (c *stateCursor) changed(out []event) ([]event, bool) {
	var keys [stateChunk]string
	n := 0
	s := c.s
	s.seqMu.Lock()
	h := &s.history
	if c.pos < h.first {
		s.seqMu.Unlock()
		return out, false
	}
	for ; n < len(keys) && c.pos <= c.upTo; c.pos++ {
		i := c.pos - h.first
		keys[n] = h.chunks[i/int64(h.chunk)][i%int64(h.chunk)]
		n++
	}
	s.seqMu.Unlock()
	start := len(out)
	defer func() { sortStates(out[start:]) }()
	for _, key := range keys[:n] {
		if _, dup := c.seen[key]; dup || !covers(c.sub.path, key) {
			continue
		}
		if c.held+seenWeight > seenMax {
			c.forget()
		}
		if c.seen == nil {
			c.seen = make(map[string]struct{})
		}
		c.seen[key] = struct{}{}
		// Counted against the connection's bound (SPEC 10), and capped.
		c.held += seenWeight
		c.sub.q.size.Add(seenWeight)
		sl := s.lock(key)
		out = c.state(out, key, sl, true)
		s.release(key, sl)
		sl.mu.Unlock()
	}
	return out, true
}

// walk appends the states of the next keys of the path, and reports
// whether there are more. A prefix is walked in the store's map; Range
// visits each key at most once, and every key that exists throughout the
// walk, which is what a state needs: a key created or deleted meanwhile
// has its change queued behind the cursor.
func (c *stateCursor) walk(out *[]event) (more bool) {
	s, path := c.s, c.sub.path
	start := len(*out)
	defer func() { sortStates((*out)[start:]) }()
	if !strings.HasSuffix(path, "/") {
		sl := s.lock(path)
		*out = c.state(*out, path, sl, true)
		s.release(path, sl)
		sl.mu.Unlock()
		return false
	}
	if c.next == nil {
		c.next, c.stop = iter.Pull2(func(yield func(string, *slot) bool) {
			s.keys.Range(func(k, v any) bool { return yield(k.(string), v.(*slot)) })
		})
	}
	for range stateScan {
		key, sl, ok := c.next()
		if !ok {
			return false
		}
		if !covers(path, key) {
			continue
		}
		sl.mu.Lock()
		*out = c.state(*out, key, sl, false)
		sl.mu.Unlock()
		if len(*out) >= stateChunk {
			return true
		}
	}
	return true
}

// sortStates sorts the key states of one read by key: a state that one
// read holds whole (up to stateChunk keys, in a store of up to stateScan)
// comes sorted, as a listing does; a larger one, in sorted runs.
func sortStates(states []event) {
	slices.SortFunc(states, func(a, b event) int { return strings.Compare(a.key, b.key) })
}

// state appends the state of key, whose slot is locked; a missing key
// only if evenMissing. Its changes pending in the queue give way to it:
// they are older or the same.
func (c *stateCursor) state(out []event, key string, sl *slot, evenMissing bool) []event {
	e := c.s.unexpired(sl.load())
	if e == nil && !evenMissing {
		return out
	}
	c.sub.q.drop(c.sub, key)
	return append(out, event{sub: c.sub, kind: evState, key: key, e: e})
}

// close ends the walk, if one began. c.mu must be held.
func (c *stateCursor) close() {
	if c.stop != nil {
		c.stop()
		c.next, c.stop = nil, nil
	}
	c.forget()
}

// forget drops the set of keys sent, and its weight. c.mu must be held.
func (c *stateCursor) forget() {
	c.seen = nil // not cleared: a cleared map keeps its memory
	c.sub.q.size.Add(-c.held)
	c.held = 0
}

// stopWalk ends the walk from outside the writer: the stream closed.
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

// history remembers the key of each recent change, in sequence order: the
// change numbered first+i changed the key at position i. It is a list of
// fixed-size chunks, appended to and dropped whole, never rewritten, so
// that a reader can scan what it saw without holding seqMu. It costs 16
// bytes a change: the key's string is the store's slot's, the same for
// every change of the key while it exists (a key deleted and written
// again has a new one); never the value.
type history struct {
	chunks [][]string // each h.chunk long when full; oldest first
	first  int64      // the number of chunks[0][0]
	max    int        // at least this many changes are kept
	chunk  int        // the length of a full chunk
}

// reset empties the history and sizes its chunks for max: a quarter of
// it, from 64 to historyChunk.
func (h *history) reset(first int64) {
	h.chunks = nil
	h.first = first
	h.chunk = min(max(h.max/4, 64), historyChunk)
}

// add remembers the key of the next change.
func (h *history) add(key string) {
	n := len(h.chunks)
	if n == 0 || len(h.chunks[n-1]) == h.chunk {
		if n > 0 && (n-1)*h.chunk >= h.max {
			// The chunks after the first hold max changes already.
			h.chunks[0] = nil // the array keeps its front: let the chunk go
			h.chunks = h.chunks[1:]
			h.first += int64(h.chunk)
		}
		h.chunks = append(h.chunks, make([]string, 0, h.chunk))
		n = len(h.chunks)
	}
	h.chunks[n-1] = append(h.chunks[n-1], key)
}

// registry maps each watched path to its subscriptions. The store's seqMu
// guards it: publishing holds it anyway, and registrations are few beside
// changes.
type registry struct {
	paths map[string]map[*subscription]struct{}
	count atomic.Int64 // registrations, so that publishing to nobody costs one load
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

// publish queues a change for the subscriptions of every path that
// covers its key (coveringPaths: /a/b/c, /a/b/, /a/, /). The cost is the
// depth of the key plus the subscriptions found, and it allocates
// nothing.
func (r *registry) publish(c change) {
	if r.count.Load() == 0 {
		return
	}
	ev := event{kind: evChange, key: c.key, e: c.e, why: c.why, seq: c.seq}
	for path := range coveringPaths(c.key) {
		for sub := range r.paths[path] {
			ev.sub = sub
			sub.q.push(ev)
		}
	}
}
