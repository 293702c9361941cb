// The keyspace in order (SPEC section 3a): listings and states read the
// keys under a prefix from the ordered index, a chunk at a time, at one
// point of the change sequence (a snapshot), so that they cost what the
// prefix holds, not what the store holds, never show part of a
// transaction, and hold a bounded amount of memory whatever they list.

package main

import (
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// snapshot is a point of the change sequence that a listing or a state
// in progress reads the store at: every change numbered up to seq shows,
// no transaction after it shows in part. (A single key's later change
// may show: a listing reflects every change up to its point, and may
// reflect later ones.)
type snapshot struct {
	seq    int64
	lost   atomic.Bool // the store changed too much while it was open to keep what it shows
	closed atomic.Bool
}

// errSnapshotLost is a listing whose point the store could no longer
// keep: it was read too slowly while too much changed.
var errSnapshotLost = &unavailableError{msg: "the listing was read too slowly while the store changed too much: list again"}

// snapshots are the points listings and states in progress read at, and
// what they need of the past: for every transaction applied after the
// oldest of them, the versions its keys had before it (undo). A
// transaction changes its keys' slots one by one, so a reader walking
// the keys could see some before and some after; at its point it takes,
// for a key a later transaction changed, the version before the first
// such transaction. Single-key changes need nothing kept: seeing one
// early shows no part of anything.
//
// What is kept is bounded (undoBudget): past it, the oldest points are
// lost (their readers start again or fail with errSnapshotLost), and
// what only they needed is dropped. With no listing or state in
// progress, nothing is kept, and a transaction costs nothing more.
type snapshots struct {
	mu     sync.RWMutex           // guards the rest; taken inside seqMu, and nothing is taken inside it
	active map[*snapshot]struct{} // open: a snapshot opens under seqMu, at the last change published
	undo   map[string][]undo
	// The keys of undo in order, so that a reader finds those of a range
	// in O(log u + k): an index of slots of their own, made for it.
	order index
	marks map[string]*slot
	held  int64        // what undo weighs, against undoBudget
	count atomic.Int64 // entries in undo: a reader takes no lock while it is 0
}

// undo is a key's version before the transaction numbered seq changed it.
type undo struct {
	seq int64
	e   *entry // nil: the key was missing
}

// undoBudget bounds what the snapshots keep of the past: old values and
// their keys, and undoWeight an entry besides.
var undoBudget int64 = 64 << 20

const undoWeight = 64

// open returns a new snapshot at seq, the last change published.
// seqMu must be held, so that no change is published meanwhile.
func (ss *snapshots) open(seq int64) *snapshot {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.active == nil {
		ss.active = make(map[*snapshot]struct{})
	}
	sn := &snapshot{seq: seq}
	ss.active[sn] = struct{}{}
	return sn
}

// openSnapshot returns a snapshot at the last change published.
func (s *Store) openSnapshot() *snapshot {
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	return s.snaps.open(s.published.Load())
}

// closeSnapshot ends a snapshot, and drops what no open one needs any
// more. A second call does nothing. It takes no lock but the snapshots'
// own, so a queue may close the cursors it drops whatever it holds.
func (s *Store) closeSnapshot(sn *snapshot) {
	if sn.closed.Swap(true) {
		return
	}
	ss := &s.snaps
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if _, ok := ss.active[sn]; ok {
		delete(ss.active, sn)
		ss.pruneLocked()
	}
}

// keep remembers, for the open snapshots, the versions a transaction's
// keys have before it: changes' slots are locked, and their versions
// not yet replaced. seqMu must be held.
func (ss *snapshots) keep(changes []change) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if len(ss.active) == 0 {
		return
	}
	if ss.undo == nil {
		ss.undo = make(map[string][]undo)
	}
	for _, c := range changes {
		old := c.sl.load()
		if _, ok := ss.undo[c.sl.key]; !ok {
			if ss.marks == nil {
				ss.marks = make(map[string]*slot)
			}
			mark := &slot{key: c.sl.key}
			ss.marks[mark.key] = mark
			ss.order.insert(mark)
		}
		ss.undo[c.sl.key] = append(ss.undo[c.sl.key], undo{c.seq, old})
		ss.held += undoWeight + size(c.sl.key, old)
	}
	ss.count.Add(int64(len(changes)))
	for ss.held > undoBudget && len(ss.active) > 0 {
		// Lose the oldest point, and what only it needed.
		var oldest *snapshot
		for sn := range ss.active {
			if oldest == nil || sn.seq < oldest.seq {
				oldest = sn
			}
		}
		oldest.lost.Store(true)
		delete(ss.active, oldest)
		ss.pruneLocked()
	}
}

// pruneLocked drops what no open snapshot needs: a snapshot at S needs
// the versions before transactions numbered after S. ss.mu must be held.
func (ss *snapshots) pruneLocked() {
	if ss.count.Load() == 0 {
		return
	}
	oldest := int64(-1)
	for sn := range ss.active {
		if oldest < 0 || sn.seq < oldest {
			oldest = sn.seq
		}
	}
	if oldest < 0 {
		ss.undo, ss.held, ss.marks = nil, 0, nil
		ss.order = index{}
		ss.count.Store(0)
		return
	}
	for key, us := range ss.undo {
		n := 0
		for n < len(us) && us[n].seq <= oldest {
			ss.held -= undoWeight + size(key, us[n].e)
			n++
		}
		switch {
		case n == len(us):
			delete(ss.undo, key)
			ss.order.remove(ss.marks[key])
			delete(ss.marks, key)
		case n > 0:
			ss.undo[key] = slices.Delete(us, 0, n)
		}
		ss.count.Add(-int64(n))
	}
}

// at returns the version of key a reader at sn sees, given its current
// version cur: the version before the first transaction after sn that
// changed it, if there is one; else cur.
func (ss *snapshots) at(sn *snapshot, key string, cur *entry) *entry {
	if ss.count.Load() == 0 {
		return cur
	}
	ss.mu.RLock()
	defer ss.mu.RUnlock()
	for _, u := range ss.undo[key] {
		if u.seq > sn.seq {
			return u.e
		}
	}
	return cur
}

// gone appends to keys those in [from, to) ("" as to: no end) that a
// transaction after sn deleted (or that have a version at sn another
// way while not in the index), with their version at sn, in key order.
func (ss *snapshots) gone(sn *snapshot, dst []rangeItem, from, to string) []rangeItem {
	if ss.count.Load() == 0 {
		return dst
	}
	ss.mu.RLock()
	defer ss.mu.RUnlock()
	var marks []*slot
	for {
		n := len(marks)
		marks = ss.order.read(marks, from, to, stateChunk)
		if len(marks)-n < stateChunk {
			break
		}
		from = marks[len(marks)-1].key + "\x00"
	}
	for _, mark := range marks {
		key, us := mark.key, ss.undo[mark.key]
		for _, u := range us {
			if u.seq > sn.seq {
				if u.e != nil {
					dst = append(dst, rangeItem{key: key, e: u.e})
				}
				break
			}
		}
	}
	return dst // in key order: the marks are
}

// rangeItem is a key read from the index: its slot, or for a key a
// transaction deleted after the reader's point, no slot and the version
// the point sees.
type rangeItem struct {
	key string
	sl  *slot
	e   *entry
}

// readRange appends to dst the keys in [from, to) ("" as to: no end)
// that a reader at sn may see, in key order: up to max keys from the
// index, and the keys the index no longer holds that sn still sees. It
// returns them and where the next read starts: "" when the range is
// read to its end. Versions are not read: the caller reads each key's
// at sn (snapshots.at), with its slot locked or not.
func (s *Store) readRange(sn *snapshot, dst []rangeItem, from, to string, max int) ([]rangeItem, string) {
	var buf [stateChunk]*slot
	slots := buf[:0]
	if max > len(buf) {
		slots = make([]*slot, 0, max)
	}
	slots = s.order.read(slots, from, to, max)
	next := ""
	if len(slots) == max {
		last := slots[len(slots)-1].key
		next, to = last+"\x00", last+"\x00" // the range read is [from, last]
	}
	gone := s.snaps.gone(sn, nil, from, to)
	for _, sl := range slots {
		for len(gone) > 0 && gone[0].key <= sl.key {
			if gone[0].key < sl.key { // else written again since: the slot tells
				dst = append(dst, gone[0])
			}
			gone = gone[1:]
		}
		dst = append(dst, rangeItem{key: sl.key, sl: sl})
	}
	return append(dst, gone...), next
}

// A listing reads the keys under a prefix, in order, at one snapshot, a
// chunk at a time; shallow, it reads the prefix's direct children: each
// key directly under it, and each deeper prefix once (an item with no
// version, whose key is the prefix).
type listing struct {
	s       *Store
	sn      *snapshot
	prefix  string
	from    string // the next key to read
	to      string
	shallow bool
}

// list starts a listing of prefix (which ends with "/"; "/" is every
// key) after after ("" for the start; with shallow, a prefix item's
// prefix skips every key under it). Close it when done.
func (s *Store) list(prefix, after string, shallow bool) *listing {
	l := &listing{s: s, sn: s.openSnapshot(), prefix: prefix, from: prefix, to: prefixEnd(prefix), shallow: shallow}
	if after != "" {
		from := after + "\x00"
		if strings.HasSuffix(after, "/") {
			from = prefixEnd(after)
		}
		if from > l.from {
			l.from = from
		}
		if l.to != "" && l.from > l.to {
			l.from = l.to
		}
	}
	return l
}

// chunkBytes is where a chunk of a listing or a state stops, whatever
// its count of keys, once its values weigh that much (one key at least):
// what a connection's writer holds at a time stays about this, however
// large the values (SPEC 10).
const chunkBytes = 256 << 10

// next appends up to max more items to dst and returns them, stopping
// once they weigh maxBytes (0: no limit); none when the listing is done.
// A listing whose snapshot was lost fails with errSnapshotLost.
func (l *listing) next(dst []item, max, maxBytes int) ([]item, error) {
	start := len(dst)
	now := l.s.now()
	weight := 0
	var buf [stateChunk]rangeItem
	for len(dst)-start < max && l.from != l.to && (maxBytes == 0 || weight < maxBytes) {
		items, next := l.s.readRange(l.sn, buf[:0], l.from, l.to, min(max-(len(dst)-start), stateChunk))
		l.from = next
		if next == "" {
			l.from = l.to
		}
		for _, it := range items {
			e := it.e
			if it.sl != nil {
				e = l.s.snaps.at(l.sn, it.key, it.sl.load())
			}
			if e == nil || e.ttl != nil && e.ttl.at <= now {
				continue
			}
			if l.shallow {
				if i := strings.IndexByte(it.key[len(l.prefix):], '/'); i >= 0 {
					// A deeper key: its prefix is the item, and every key
					// under it is skipped.
					sub := it.key[:len(l.prefix)+i+1]
					dst = append(dst, item{key: sub})
					l.from = prefixEnd(sub)
					break
				}
			}
			dst = append(dst, item{it.key, e})
			weight += len(it.key) + len(e.value)
			if len(dst)-start == max || maxBytes > 0 && weight >= maxBytes {
				l.from = it.key + "\x00"
				break
			}
		}
	}
	if l.sn.lost.Load() {
		return dst, errSnapshotLost
	}
	return dst, nil
}

// done reports whether the listing has read everything.
func (l *listing) done() bool { return l.from == l.to }

// close ends the listing.
func (l *listing) close() { l.s.closeSnapshot(l.sn) }

// seq is the listing's point: every change up to it shows.
func (l *listing) seq() int64 { return l.sn.seq }

// List returns every key under prefix (which ends with "/"; "/" is every
// key) with its current version, in key order, as of one point of the
// change sequence.
func (s *Store) List(prefix string) []item {
	l := s.list(prefix, "", false)
	defer l.close()
	var items []item
	for {
		n := len(items)
		items, _ = l.next(items, stateChunk, 0)
		if len(items) == n {
			return items
		}
	}
}
