// The change sequence (SPEC section 4a): every change of the store is
// numbered, remembered for a while, and published to the subscriptions
// that watch its key, in that order; a subscription starts live, with the
// current state, or where a client left off.

package main

import (
	"slices"
	"strings"
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
func (s *Store) Subscribe(sub *subscription, from int64) (start int64) {
	s.seqMu.Lock()
	// Every change up to before is published; every later one will find
	// sub registered.
	before := s.published.Load()
	if from > 0 && from <= before {
		sub.floor = from
	}
	sub.syncing = from != fromNow
	s.subs.add(sub)
	s.seqMu.Unlock()
	if from == fromNow {
		return before
	}
	if from > 0 {
		if keys, upTo, ok := s.changedSince(sub.path, from); ok {
			for _, key := range keys {
				s.queueState(sub, key, true)
			}
			sub.q.push(event{sub: sub, kind: evSynced, seq: upTo})
			return sub.floor
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
	return sub.floor
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
	first, size := s.history.first, int64(s.history.chunk)
	chunks := slices.Clone(s.history.chunks)
	s.seqMu.Unlock()
	if since < first-1 || since > upTo {
		return nil, upTo, false
	}
	seen := make(map[string]bool)
	for seq := since + 1; seq <= upTo; seq++ {
		i := seq - first
		key := chunks[i/size][i%size]
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

// historyChunk is the most changes a chunk of the history holds; a small
// history has smaller chunks, so that it keeps about what it was asked.
const historyChunk = 4096

// history remembers the key of each recent change, in sequence order: the
// change numbered first+i changed the key at position i. It is a list of
// fixed-size chunks, appended to and dropped whole, never rewritten, so
// that a reader can scan what it saw without holding seqMu. It costs 16
// bytes a change, plus the key's bytes if nothing else holds them; never
// the value.
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

// Unsubscribe removes the registration of sub.
func (s *Store) Unsubscribe(sub *subscription) {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
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
func (r *registry) publish(c change) {
	if r.count.Load() == 0 {
		return
	}
	ev := event{kind: evChange, key: c.key, e: c.e, why: c.why, seq: c.seq}
	key := c.key
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
