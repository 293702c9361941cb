package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"iter"
	"maps"
	"os"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The crash-state test, after ALICE (Pillai et al., OSDI 2014) and
// CrashMonkey: a workload runs on a file system in memory that records
// every operation; then, for every prefix of that list, the directory a
// crash there could leave is built and recovered.
//
//   - kill -9: every operation of the prefix done, nothing else;
//   - power loss: only what was made durable is sure. A file's data is
//     durable up to its last fsync; the directory's entries (create,
//     rename, remove) up to its last fsync. The rest may be lost: the
//     states tried lose each file's unsynced writes from the end (the
//     last one, the last one torn in half or left as zeroes, all of
//     them), and the directory's unsynced entries from the end (the last,
//     the last two, all), as a journaling file system that keeps the
//     order of each file's writes and of its metadata would.
//
// Each state must start; the changes the mode promised must be there
// (kill -9: every acknowledged write, and exactly what was written; power
// loss: every change whose record had been fsynced); the change sequence
// never goes back below that; each key holds a version it had at some
// point no earlier than where recovery ends; every transaction is there
// whole or not at all (its keys all at its version or a later one, or
// all at one from before it); and the recovered directory takes a write
// and starts again with it.

// crashState is a directory a crash leaves after a prefix of the
// operations, and what recovering it must give.
type crashState struct {
	what    string
	img     image
	exact   bool  // kill -9: every change written is there, and nothing else
	promise int64 // the change sequence must reach at least this
	written int64 // the last change written: nothing after it exists
}

// loss is one way a power failure treats the unsynced operations of a
// prefix: the directory's last dirDrop unsynced entries are lost, and
// of the file ino (0: none) the last dataDrop unsynced writes, the
// first of them kept as tear says (-1 lost whole, -2 zeroes, n > 0 its
// first n bytes).
type loss struct {
	dirDrop, dataDrop, ino, tear int
}

// crashStates returns the states a crash could leave after each prefix of
// ops, deduplicated.
func crashStates(ops []fsOp) []crashState {
	// A directory reached several ways recovers the same way each time,
	// so it is checked once, against all of what each way requires.
	var states []crashState
	seen := map[string]int{}
	add := func(st crashState) {
		key := fmt.Sprintf("%x %v", st.img.hash(), st.exact)
		if i, ok := seen[key]; ok {
			states[i].promise = max(states[i].promise, st.promise)
			states[i].written = min(states[i].written, st.written)
			return
		}
		seen[key] = len(states)
		states = append(states, st)
	}
	names, inos := map[string]int{}, map[int][]byte{}
	var acked, written, durable int64
	for k := 0; k <= len(ops); k++ {
		if k > 0 {
			op := ops[k-1]
			apply(names, inos, op, -1)
			switch op.kind {
			case opAck:
				acked = max(acked, op.seq)
			case opWrite:
				written = max(written, lastChange(op.data))
			case opSync:
				durable = max(durable, lastChange(inos[op.ino]))
			}
		}
		kill := image{}
		for p, ino := range names {
			kill[p] = inos[ino]
		}
		at := fmt.Sprintf("op %d", k)
		if k > 0 {
			at = fmt.Sprintf("op %d (%v)", k, ops[k-1])
		}
		add(crashState{what: "kill -9 after " + at, img: kill, exact: true, promise: acked, written: written})
		prefix := ops[:k]
		for _, l := range losses(prefix) {
			add(crashState{what: fmt.Sprintf("power loss after %s, losing %+v", at, l), img: powerLoss(prefix, l), promise: durable, written: written})
		}
	}
	return states
}

// lastChange is the number of the last change whose record b holds whole.
func lastChange(b []byte) int64 {
	rr := newRecordReader("", bytes.NewReader(b), int64(len(b)))
	var last int64
	for {
		body, err := rr.next()
		if err != nil {
			return last
		}
		if isChange(body) {
			if cs, _, err := decodeChanges(body); err == nil {
				last = cs[0].seq
			}
		}
	}
}

// isChange reports whether a record's body is a change: one key's ('S',
// 'D', 'X') or a transaction's ('T').
func isChange(body []byte) bool { return strings.IndexByte("SDXT", body[0]) >= 0 }

// unsynced returns the indexes of the prefix's operations a power loss
// may lose: the directory's entries since its last fsync, and each
// file's writes and truncations since its last fsync.
func unsynced(ops []fsOp) (dir []int, data map[int][]int) {
	data = map[int][]int{}
	for i, op := range ops {
		switch op.kind {
		case opCreate, opRename, opRemove:
			dir = append(dir, i)
		case opSyncDir:
			dir = nil
		case opWrite, opTruncate:
			data[op.ino] = append(data[op.ino], i)
		case opSync:
			delete(data, op.ino)
		}
	}
	return dir, data
}

// losses returns the bounded ways a power loss may treat a prefix: all
// that is unsynced lost; the directory's last one, two or all unsynced
// entries; each file's last write (whole, torn in half, as zeroes) or
// all its unsynced writes.
func losses(ops []fsOp) []loss {
	dir, data := unsynced(ops)
	if len(dir) == 0 && len(data) == 0 {
		return nil
	}
	ls := []loss{{dirDrop: len(dir), ino: -1}} // everything unsynced lost
	for _, n := range []int{1, 2, len(dir)} {
		if n <= len(dir) {
			ls = append(ls, loss{dirDrop: n})
		}
	}
	for ino, idx := range data {
		ls = append(ls, loss{ino: ino, dataDrop: 1, tear: -1}, loss{ino: ino, dataDrop: len(idx), tear: -1})
		if last := ops[idx[len(idx)-1]]; last.kind == opWrite {
			ls = append(ls, loss{ino: ino, dataDrop: 1, tear: -2})
			if len(last.data) > 1 {
				ls = append(ls, loss{ino: ino, dataDrop: 1, tear: len(last.data) / 2})
			}
		}
	}
	return ls
}

// powerLoss builds the directory a power loss leaves after ops, losing
// what l says (ino -1: every file's unsynced writes).
func powerLoss(ops []fsOp, l loss) image {
	dir, data := unsynced(ops)
	lost := map[int]int{} // op index -> how it is kept (as apply's keep)
	for _, i := range dir[len(dir)-l.dirDrop:] {
		lost[i] = 0
	}
	for ino, idx := range data {
		switch {
		case l.ino == -1:
			for _, i := range idx {
				lost[i] = 0
			}
		case ino == l.ino:
			drop := idx[len(idx)-l.dataDrop:]
			for _, i := range drop {
				lost[i] = 0
			}
			if ops[drop[0]].kind == opWrite && l.tear != -1 {
				if l.tear == -2 {
					lost[drop[0]] = -2
				} else {
					lost[drop[0]] = l.tear
				}
			}
		}
	}
	names, inos := map[string]int{}, map[int][]byte{}
	for i, op := range ops {
		keep, ok := lost[i]
		switch {
		case !ok:
			apply(names, inos, op, -1)
		case keep != 0:
			apply(names, inos, op, keep)
		}
	}
	img := image{}
	for p, ino := range names {
		img[p] = inos[ino]
	}
	return img
}

// changeLog is what a workload did: the changes of each number, one
// key's or a transaction's, each key with the version it left (nil:
// missing), in sequence order.
type changeLog struct {
	first   int64             // the number of the first change
	changes [][]loggedChange  // changes[i]: those numbered first+i
	history map[string][]step // of each key, as of now (index)
}

type loggedChange struct {
	key string
	e   *entry
}

// step is a key's version (as version gives it) from the change
// numbered seq on.
type step struct {
	seq int64
	v   string
}

// add notes the changes numbered seq, which must be the next number.
func (cl *changeLog) add(seq int64, cs ...loggedChange) error {
	if len(cl.changes) == 0 && cl.first == 0 {
		cl.first = seq
	}
	if want := cl.first + int64(len(cl.changes)); seq != want {
		return fmt.Errorf("change %d after %d changes from %d: one was not recorded", seq, len(cl.changes), cl.first)
	}
	cl.changes = append(cl.changes, cs)
	return nil
}

// next is the number the next change must have.
func (cl *changeLog) next() int64 { return cl.first + int64(len(cl.changes)) }

// at returns the changes numbered seq.
func (cl *changeLog) at(seq int64) []loggedChange {
	if seq < cl.first || seq >= cl.next() {
		return nil
	}
	return cl.changes[seq-cl.first]
}

// transactions counts the numbers with more than one change.
func (cl *changeLog) transactions() (n int) {
	for _, cs := range cl.changes {
		if len(cs) > 1 {
			n++
		}
	}
	return n
}

// version is how a state compares a key's version: revision, value and
// deadline; "" for missing or expired by now.
func version(e *entry, now int64) string {
	if e == nil || e.ttl != nil && e.ttl.at <= now {
		return ""
	}
	return fmt.Sprintf("%d=%s@%d", e.revision, e.value, e.deadline())
}

// stateAt returns every key's version, as of now, after the change
// numbered n.
func (cl *changeLog) stateAt(n, now int64) map[string]string {
	m := map[string]string{}
	for seq := cl.first; seq <= n && seq < cl.next(); seq++ {
		for _, c := range cl.at(seq) {
			if v := version(c.e, now); v != "" {
				m[c.key] = v
			} else {
				delete(m, c.key)
			}
		}
	}
	return m
}

// index builds each key's history as of now: missing before the first
// change, then each version a change left.
func (cl *changeLog) index(now int64) {
	cl.history = map[string][]step{}
	for i, cs := range cl.changes {
		for _, c := range cs {
			if cl.history[c.key] == nil {
				cl.history[c.key] = []step{{cl.first - 1, ""}}
			}
			cl.history[c.key] = append(cl.history[c.key], step{cl.first + int64(i), version(c.e, now)})
		}
	}
}

// inPart returns an error if got, the versions of a recovered store,
// shows a transaction numbered up to written in part: some of its keys
// at its version or a later one, others at a version from before it. A
// key whose version it had both before and since (missing, say) shows
// neither. index must have been called.
func (cl *changeLog) inPart(got map[string]string, written int64) error {
	for seq := cl.first; seq <= written && seq < cl.next(); seq++ {
		cs := cl.at(seq)
		if len(cs) < 2 {
			continue
		}
		var since, before []string
		for _, c := range cs {
			var isSince, isBefore bool
			for _, st := range cl.history[c.key] {
				if st.seq > written || st.v != got[c.key] {
					continue
				}
				if st.seq >= seq {
					isSince = true
				} else {
					isBefore = true
				}
			}
			switch {
			case isSince && !isBefore:
				since = append(since, c.key)
			case isBefore && !isSince:
				before = append(before, c.key)
			}
		}
		if len(since) > 0 && len(before) > 0 {
			return fmt.Errorf("transaction %d shows in part: %v at its version or a later one, %v at one from before it", seq, since, before)
		}
	}
	return nil
}

const crashDir = "/data"

// startCrashData opens a store on a new memFS in the given mode, with a
// rotation every 4 × (about 600 bytes of live data) of log, each one made
// when it is due even if the last compaction still runs (so a workload
// makes as many every run: awaitCompaction), the 1-second fsync every
// syncEvery instead, and the rotation order reversed if newLogFirst.
//
// With base not 0 the change sequence starts there rather than at a
// random number, so that records are as long every run (a number is a
// varint of 5 to 8 bytes) and rotations fall at the same records: the
// directory's first snapshot, of no keys, is written as the server
// writes it in a new directory (writeSnapshot: the same operations,
// recorded), and the store opened on it.
func startCrashData(t *testing.T, mode fsyncMode, clk *fakeClock, syncEvery time.Duration, newLogFirst bool, base int64) (*memFS, *Store, *dataDir) {
	t.Helper()
	m := newMemFS()
	if base != 0 {
		seedCrashData(t, m, base)
	}
	s := NewStore(0, clk)
	d, err := loadDataFS(m, crashDir, mode, s, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	d.minCompact = 1 << 8
	d.syncEvery = syncEvery
	d.newLogFirst = newLogFirst
	d.awaitCompaction = true // every rotation due is made: as many each run
	d.start()
	return m, s, d
}

// seedCrashData writes the first snapshot of a directory, of no keys, as
// of change base, as the server writes it in a new directory.
func seedCrashData(t *testing.T, m *memFS, base int64) {
	t.Helper()
	first := &dataDir{fs: m, dir: crashDir, s: NewStore(0, nil)}
	if err := first.writeSnapshot(base); err != nil {
		t.Fatal(err)
	}
}

// crashBase is where the one writer's change sequence starts: as
// NewStore would pick, (1 + n) << 32.
const crashBase = 0x5a5a << 32

// crashScale multiplies the workloads: 1, or 4 with ATOMKV_LOAD=1.
func crashScale() int {
	if os.Getenv("ATOMKV_LOAD") != "" {
		return 4
	}
	return 1
}

// crashWorkload writes, CASes, deletes, expires and compacts on a memFS
// in the given mode, with transactions among the single writes, and
// returns the operations it recorded and the changes it made. One
// writer, each write waited for, so every write of the log holds one
// record; with the sequence starting at crashBase, where the rotations
// fall, and which records are first and last in a log, do not depend on
// the scheduler.
func crashWorkload(t *testing.T, mode fsyncMode, clk *fakeClock, newLogFirst bool) ([]fsOp, *changeLog) {
	t.Helper()
	// The test syncs itself, at known points.
	m, s, d := startCrashData(t, mode, clk, time.Hour, newLogFirst, crashBase)
	cl := &changeLog{first: s.seq + 1}
	last := func() int64 {
		s.seqMu.Lock()
		defer s.seqMu.Unlock()
		return s.seq
	}
	// record notes the change just acknowledged, of key, if it made one
	// (deleting a missing key does not).
	record := func(key string) {
		seq := last()
		if seq == cl.next()-1 {
			return
		}
		if err := cl.add(seq, loggedChange{key, s.Get(key)}); err != nil {
			t.Fatal(err)
		}
		m.ack(seq)
	}
	// commit commits a transaction and notes the change it made: each
	// op's key at the version it left, but a delete of a missing key,
	// which changes nothing. conflicts says that a check fails: then
	// nothing changes.
	commit := func(tx *txn, conflicts bool) {
		before := last()
		err := s.Commit(tx)
		var conflict *conflictError
		switch {
		case conflicts && errors.As(err, &conflict):
			if seq := last(); seq != before {
				t.Fatalf("a transaction whose check failed: at change %d; want %d, no change", seq, before)
			}
			return
		case conflicts:
			t.Fatalf("a transaction whose check fails: %v; want a conflict", err)
		case err != nil:
			t.Fatalf("transaction %+v: %v", tx.ops, err)
		}
		var cs []loggedChange
		for i, o := range tx.ops {
			if !o.del || tx.existed[i] {
				cs = append(cs, loggedChange{o.key, tx.versions[i]})
			}
		}
		if len(cs) == 0 {
			if seq := last(); seq != before || tx.seq != before {
				t.Fatalf("a transaction that changes nothing: at change %d, answered %d; want %d, no change", seq, tx.seq, before)
			}
			return
		}
		if err := cl.add(tx.seq, cs...); err != nil {
			t.Fatal(err)
		}
		m.ack(tx.seq)
	}
	rev := func(key string) int64 { return revisionOf(s.Get(key)) }
	set := func(key, value string, ttl time.Duration) op { return op{key: key, value: value, ttl: ttl} }
	del := func(key string) op { return op{key: key, del: true} }
	var err error
	for i := range 150 * crashScale() {
		key := fmt.Sprintf("/k/%d", i%13)
		value := fmt.Sprintf(`{"i":%d,"pad":"%s"}`, i, strings.Repeat("x", i%40))
		switch i % 8 {
		case 0, 1, 2:
			_, err = s.Set(key, value, 0)
		case 3:
			_, err = s.Set(key, value, time.Hour)
		case 4:
			cur := s.Get(key)
			_, err = s.CompareAndSwap(key, value, cur.next(), 0)
		case 5:
			_, err = s.Delete(key, -1)
		case 6:
			if cur := s.Get(key); cur != nil {
				_, err = s.Delete(key, cur.revision)
			}
		case 7:
			// A key with a second to live, and the clock moved past it:
			// its expiry is a change too. Deleting the key, missing now,
			// changes nothing but waits for the expiry to be written:
			// in a write of its own, as every change of this workload.
			if _, err = s.Set("/short", value, time.Second); err == nil {
				record("/short")
				clk.Advance(2 * time.Second)
				if err = cl.add(cl.next(), loggedChange{"/short", nil}); err != nil {
					t.Fatal(err)
				}
				if _, err = s.Delete("/short", -1); err == nil {
					_, err = s.Set(key, value, 0)
				}
			}
		}
		if err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		record(key)
		if i%3 == 1 {
			// A transaction of 2 to 4 keys, some of them the single
			// writes' too: sets with and without a TTL, deletes, checks
			// that hold; and one whose check fails, one that changes
			// nothing, one that changes a single key.
			k := fmt.Sprintf("/k/%d", (i+7)%13)
			v := func(j int) string { return fmt.Sprintf(`{"t":%d,"op":%d}`, i, j) }
			switch i / 3 % 8 {
			case 0:
				commit(&txn{ops: []op{set("/t/a", v(0), 0), set(k, v(1), time.Hour)}}, false)
			case 1:
				commit(&txn{ops: []op{set("/t/b", v(0), 0), set("/t/c", v(1), time.Hour), del("/t/a")}}, false)
			case 2: // checks that hold, one of a missing key
				commit(&txn{checks: []check{{"/t/a", rev("/t/a")}, {"/t/b", rev("/t/b")}},
					ops: []op{set("/t/a", v(0), 0), del("/t/b"), set(k, v(1), 0)}}, false)
			case 3: // a check that fails, beside one that holds: nothing is written
				commit(&txn{checks: []check{{"/t/a", rev("/t/a")}, {"/t/c", rev("/t/c") + 7}},
					ops: []op{set("/t/c", v(0), 0), del("/t/a")}}, true)
			case 4:
				commit(&txn{ops: []op{set("/t/a", v(0), 0), set("/t/b", v(1), time.Hour), set("/t/c", v(2), 0), set("/t/d", v(3), time.Hour)}}, false)
			case 5: // deletes of missing keys: no change, no number
				commit(&txn{ops: []op{del("/t/none"), del("/t/none/2")}}, false)
			case 6: // a delete of a missing key beside a set: one change, one key's record
				commit(&txn{checks: []check{{"/t/none", noRevision}}, ops: []op{del("/t/none"), set(k, v(0), 0)}}, false)
			case 7:
				commit(&txn{checks: []check{{k, rev(k)}}, ops: []op{del("/t/b"), del("/t/c"), del("/t/d"), set(k, v(0), time.Hour)}}, false)
			}
		}
		if mode == fsyncSecond && i%5 == 4 {
			if err := d.syncDirty(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := d.close(); err != nil {
		t.Fatal(err)
	}
	if d.snapshots.Load() < 3 {
		t.Fatalf("%d compactions in the workload; want at least 3", d.snapshots.Load())
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	places := txnPlaces(m.ops)
	t.Logf("transaction records: %v", places)
	if places["first in a log"] == 0 || places["last in a log"] == 0 {
		t.Fatalf("transaction records %v; want some first in a log, after a rotation, and some last, before one", places)
	}
	return m.ops, cl
}

// txnPlaces counts where the transactions' records ('T') were written:
// in all; first in a log (after a rotation); last in a log a rotation
// ended; while a snapshot was being written (from the creation of its
// .tmp to its rename); first after a snapshot was renamed into place.
func txnPlaces(ops []fsOp) map[string]int {
	places := map[string]int{}
	var logs []int           // in the order they were created
	first := map[int]byte{}  // of a log: the kind of its first change record
	lastOf := map[int]byte{} // and of its last
	snapping, renamed := false, false
	for _, op := range ops {
		switch op.kind {
		case opCreate:
			if strings.HasPrefix(path.Base(op.name), "log-") {
				logs = append(logs, op.ino)
			}
			snapping = snapping || strings.HasSuffix(op.name, ".tmp")
		case opRename:
			snapping, renamed = false, true
		case opWrite:
			if !slices.Contains(logs, op.ino) {
				continue
			}
			rr := newRecordReader("", bytes.NewReader(op.data), int64(len(op.data)))
			for body, err := rr.next(); err == nil; body, err = rr.next() {
				if !isChange(body) {
					continue
				}
				if first[op.ino] == 0 {
					first[op.ino] = body[0]
				}
				lastOf[op.ino] = body[0]
				if body[0] == 'T' {
					places["in all"]++
					if snapping {
						places["while a snapshot is written"]++
					}
					if renamed {
						places["first after a snapshot"]++
					}
				}
				renamed = false
			}
		}
	}
	for i, ino := range logs {
		if i > 0 && first[ino] == 'T' {
			places["first in a log"]++
		}
		if i < len(logs)-1 && lastOf[ino] == 'T' {
			places["last in a log"]++
		}
	}
	return places
}

// crashWorkloadConcurrent is five writers at once, so that changes share
// batches (group commit) and compactions run beside them: four write
// sets (some with a TTL), deletes and compare-and-swaps of their own
// keys and of one they share; the fifth, two-key transactions of its
// own keys and of the shared one. The changes are read back from the
// records written, in sequence order; each acknowledgement is marked with
// its value, unique, and numbered from them.
func crashWorkloadConcurrent(t *testing.T, mode fsyncMode, clk *fakeClock, newLogFirst bool) ([]fsOp, *changeLog) {
	t.Helper()
	m, s, d := startCrashData(t, mode, clk, time.Millisecond, newLogFirst, 0)
	ack := func(value string) {
		m.mu.Lock()
		m.do(fsOp{kind: opAck, value: value})
		m.mu.Unlock()
	}
	writes := 60 * crashScale()
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range writes {
				key := fmt.Sprintf("/c/%d/%d", w, i%5)
				value := fmt.Sprintf(`"%d-%d"`, w, i)
				var err error
				switch i % 5 {
				case 0, 1:
					_, err = s.Set(key, value, 0)
				case 2:
					_, err = s.Set(key, value, time.Hour)
				case 3:
					_, err = s.CompareAndSwap("/shared", value, s.Get("/shared").next(), 0)
					if errors.Is(err, errConflict) {
						continue // another writer's came first: no change
					}
				case 4:
					if _, err = s.Delete(key, -1); err == nil {
						continue // a delete's acknowledgement: not marked
					}
				}
				if err != nil {
					t.Errorf("writer %d, write %d: %v", w, i, err)
					return
				}
				ack(value)
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range writes {
			a, b := fmt.Sprintf("/c/t/%d", i%3), fmt.Sprintf("/c/t/%d", (i+1)%3)
			va, vb := fmt.Sprintf(`"t-%d-a"`, i), fmt.Sprintf(`"t-%d-b"`, i)
			tx := &txn{}
			switch i % 4 {
			case 0:
				tx.ops = []op{{key: a, value: va}, {key: b, value: vb, ttl: time.Hour}}
			case 1: // b may be missing: then one change, one key's record
				tx.ops = []op{{key: a, value: va}, {key: b, del: true}}
			case 2: // checks that hold: no one else writes these keys
				tx.checks = []check{{a, revisionOf(s.Get(a))}, {b, revisionOf(s.Get(b))}}
				tx.ops = []op{{key: a, value: va}, {key: b, value: vb}}
			case 3: // a check of the shared key, which the others swap: it may fail
				tx.checks = []check{{"/shared", revisionOf(s.Get("/shared"))}}
				tx.ops = []op{{key: "/shared", value: va}, {key: a, value: vb, ttl: time.Hour}}
			}
			err := s.Commit(tx)
			if errors.Is(err, errConflict) {
				continue
			}
			if err != nil {
				t.Errorf("the transactions' writer, transaction %d: %v", i, err)
				return
			}
			ack(va)
		}
	}()
	wg.Wait()
	if err := d.close(); err != nil {
		t.Fatal(err)
	}
	if d.snapshots.Load() < 1 {
		t.Fatalf("%d compactions in the workload; want some", d.snapshots.Load())
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	cl := &changeLog{}
	seqOf := map[string]int64{}
	batches, largest := 0, 0
	for _, op := range m.ops {
		if op.kind != opWrite {
			continue
		}
		rr := newRecordReader("", bytes.NewReader(op.data), int64(len(op.data)))
		n := 0 // changes in this write: a batch
		for body, err := rr.next(); err == nil; body, err = rr.next() {
			if !isChange(body) {
				continue
			}
			n++
			changes, expires, err := decodeChanges(body)
			if err != nil {
				t.Fatal(err)
			}
			var cs []loggedChange
			for i, c := range changes {
				if c.e != nil && expires[i] != 0 {
					c.e.ttl = &deadline{at: expires[i], key: c.key, index: -1}
				}
				cs = append(cs, loggedChange{c.key, c.e})
				if c.e != nil {
					seqOf[c.e.value] = c.seq
				}
			}
			if err := cl.add(changes[0].seq, cs...); err != nil {
				t.Fatal(err)
			}
		}
		if n > 0 {
			batches, largest = batches+1, max(largest, n)
		}
	}
	t.Logf("%d changes (%d transactions) in %d batches, the largest of %d", len(cl.changes), cl.transactions(), batches, largest)
	ops := slices.Clone(m.ops)
	for i, op := range ops {
		if op.kind == opAck {
			if ops[i].seq = seqOf[op.value]; ops[i].seq == 0 {
				t.Fatalf("%s acknowledged, but no record of it was written", op.value)
			}
		}
	}
	return ops, cl
}

// checkCrashState recovers st and checks what it must hold.
func checkCrashState(st crashState, cl *changeLog, mode fsyncMode, clk *fakeClock) error {
	fs := memFSOf(st.img)
	s := NewStore(0, clk)
	d, err := loadDataFS(fs, crashDir, mode, s, discardLogger())
	if err != nil {
		return fmt.Errorf("does not start: %v", err)
	}
	now := clk.Now().UnixNano()
	n := s.seq
	got := map[string]string{}
	s.walk(func(key string, e *entry) { got[key] = version(e, now) })
	want := cl.stateAt(n, now)
	if st.written == 0 { // nothing written yet: a new sequence, no keys
		st.promise, st.written, want = n, n, nil
	}
	switch {
	case n < st.promise:
		d.close()
		return fmt.Errorf("the change sequence is at %d; %d was promised", n, st.promise)
	case n > st.written:
		d.close()
		return fmt.Errorf("the change sequence is at %d; only %d changes were written", n, st.written)
	case st.exact && n != st.written:
		d.close()
		return fmt.Errorf("the change sequence is at %d; %d were written, which a kill -9 keeps", n, st.written)
	}
	// Each key holds its version after change n or, with a snapshot
	// newer than what a power loss kept of the log, one of its later
	// ones: never an older one, never one it never had.
	keys := map[string]bool{}
	for k := range got {
		keys[k] = true
	}
	for k := range want {
		keys[k] = true
	}
	for k := range keys {
		ok := got[k] == want[k]
		for i := n + 1; !ok && !st.exact && i <= st.written; i++ {
			for _, c := range cl.at(i) {
				ok = ok || c.key == k && version(c.e, now) == got[k]
			}
		}
		if !ok {
			d.close()
			return fmt.Errorf("after change %d, %s is %q; want %q", n, k, got[k], want[k])
		}
	}
	// A transaction is all or none: its keys all at its version or a
	// later one, or all at one from before it. (Where a key holds a
	// version later than change n, the rule above allows it key by key.)
	if err := cl.inPart(got, st.written); err != nil {
		d.close()
		return fmt.Errorf("after change %d, %v", n, err)
	}
	// The recovered directory takes a write and starts again with it.
	d.start()
	if _, err := s.Set("/after", "1", 0); err != nil {
		d.close()
		return fmt.Errorf("a write after recovery: %v", err)
	}
	if err := d.close(); err != nil {
		return fmt.Errorf("closing after recovery: %v", err)
	}
	s2 := NewStore(0, clk)
	d2, err := loadDataFS(fs, crashDir, mode, s2, discardLogger())
	if err != nil {
		return fmt.Errorf("does not start again after recovery and one write: %v", err)
	}
	defer d2.close()
	got2 := map[string]string{}
	s2.walk(func(key string, e *entry) { got2[key] = version(e, now) })
	got["/after"] = version(s.Get("/after"), now)
	if s2.seq != n+1 || !mapsEqual(got2, got) {
		return fmt.Errorf("started again after recovery and one write: at change %d with %d keys; want %d with %d", s2.seq, len(got2), n+1, len(got))
	}
	return nil
}

// crashCheck runs the workload in mode and checks every crash state; it
// returns how many states it checked and the failures.
func crashCheck(t *testing.T, workload crashWorkloadFunc, mode fsyncMode, newLogFirst bool) (states int, failures []string) {
	clk := newFakeClock()
	ops, cl := workload(t, mode, clk, newLogFirst)
	cl.index(clk.Now().UnixNano())
	sts := crashStates(ops)
	for _, st := range sts {
		if err := checkCrashState(st, cl, mode, clk); err != nil {
			failures = append(failures, fmt.Sprintf("%s: %v", st.what, err))
		}
	}
	if mode == fsyncAlways {
		// Every acknowledged write was fsynced first.
		var durable int64
		inos := map[int][]byte{}
		for _, op := range ops {
			apply(map[string]int{}, inos, op, -1)
			switch {
			case op.kind == opSync:
				durable = max(durable, lastChange(inos[op.ino]))
			case op.kind == opAck && op.seq > durable:
				failures = append(failures, fmt.Sprintf("change %d acknowledged before it was fsynced (-fsync always)", op.seq))
			}
		}
	}
	t.Logf("-fsync %s: %d operations, %d changes (%d transactions), %d crash states, %d failures", mode.String(), len(ops), len(cl.changes), cl.transactions(), len(sts), len(failures))
	return len(sts), failures
}

// crashWorkloadFunc runs a workload in mode on a memFS and returns the
// operations it recorded and the changes it made.
type crashWorkloadFunc func(t *testing.T, mode fsyncMode, clk *fakeClock, newLogFirst bool) ([]fsOp, *changeLog)

// TestCrashStates enumerates the crash states of the workloads in each
// -fsync mode and checks each one: one writer, whose every change the
// test knows, transactions among them; and five at once, whose changes
// share batches, one of them writing transactions. With ATOMKV_LOAD=1
// the workloads are 4 times as long, and the five writers run with
// -fsync never too.
func TestCrashStates(t *testing.T) {
	concurrentModes := []fsyncMode{fsyncAlways, fsyncSecond}
	if crashScale() > 1 {
		concurrentModes = append(concurrentModes, fsyncNever)
	}
	start := time.Now()
	total := 0
	for _, w := range []struct {
		name     string
		workload crashWorkloadFunc
		modes    []fsyncMode
	}{
		{"one writer", crashWorkload, []fsyncMode{fsyncAlways, fsyncSecond, fsyncNever}},
		{"five writers", crashWorkloadConcurrent, concurrentModes},
	} {
		for _, mode := range w.modes {
			t.Run(w.name+", -fsync "+mode.String(), func(t *testing.T) {
				n, failures := crashCheck(t, w.workload, mode, false)
				total += n
				for i, f := range failures {
					if i == 10 {
						t.Errorf("... and %d more", len(failures)-10)
						break
					}
					t.Error(f)
				}
			})
		}
	}
	t.Logf("%d crash states checked in %v", total, time.Since(start).Round(100*time.Millisecond))
}

// TestCrashStatesFindReversedRotation: with the rotation order reversed
// (the new log created before the old one is made durable), the
// enumeration finds power-loss states that do not start.
func TestCrashStatesFindReversedRotation(t *testing.T) {
	_, failures := crashCheck(t, crashWorkload, fsyncSecond, true)
	found := false
	for _, f := range failures {
		found = found || strings.Contains(f, "power loss") && strings.Contains(f, "the changes between are missing")
	}
	if !found {
		t.Fatalf("the reversed rotation order: %d failures %q; want power-loss states that refuse with the changes between missing", len(failures), failures)
	}
	t.Logf("the reversed order fails %d states, as: %s", len(failures), failures[0])
}

// crashTxnLog writes, on a memFS with -fsync always, three keys, then a
// transaction of four ops (a set with a TTL, a delete, a new key, a
// set), then `after` single writes, and closes the directory. It returns
// the directory, the path of its newest log, each key's version before
// the transaction, and the transaction's number.
func crashTxnLog(t *testing.T, clk *fakeClock, after int) (img image, log string, before map[string]string, seq int64) {
	t.Helper()
	m, s, d := startCrashData(t, fsyncAlways, clk, time.Hour, false, 0)
	must := func(_ *entry, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(s.Set("/a", `{"a":1}`, 0))
	must(s.Set("/b", `"b"`, time.Hour))
	must(s.Set("/c", `3`, 0))
	before = crashStoreState(s, clk)
	tx := &txn{ops: []op{
		{key: "/a", value: `{"a":2}`, ttl: time.Hour},
		{key: "/b", del: true},
		{key: "/d", value: `"new"`},
		{key: "/c", value: `4`},
	}}
	if err := s.Commit(tx); err != nil {
		t.Fatal(err)
	}
	for i := range after {
		must(s.Set("/e", fmt.Sprint(i), 0))
	}
	if err := d.close(); err != nil {
		t.Fatal(err)
	}
	img = image{}
	var logs []string
	for p, ino := range m.names {
		img[p] = m.inos[ino]
		if strings.HasPrefix(path.Base(p), "log-") {
			logs = append(logs, p)
		}
	}
	slices.Sort(logs)
	return img, logs[len(logs)-1], before, tx.seq
}

// crashStoreState returns every key's version, as checkCrashState
// compares them.
func crashStoreState(s *Store, clk *fakeClock) map[string]string {
	now := clk.Now().UnixNano()
	m := map[string]string{}
	s.walk(func(key string, e *entry) { m[key] = version(e, now) })
	return m
}

// recordOffsets returns where each record of a file starts, and its end.
func recordOffsets(b []byte) []int {
	rr := newRecordReader("", bytes.NewReader(b), int64(len(b)))
	offs := []int{0}
	for _, err := rr.next(); err == nil; _, err = rr.next() {
		offs = append(offs, int(rr.off))
	}
	return offs
}

// TestCrashTornTransaction: a newest log whose last record is a
// transaction's, cut at every byte offset, or zeroes from every byte
// offset on (as a file system that keeps a file's size but not its last
// blocks leaves it: from a block boundary, which may fall anywhere in a
// record), or with any byte of its body flipped (its checksum then fails
// at the end), starts with none of the transaction's ops, the log
// truncated where its record began; and takes the next change. So does
// a log whose transaction's record is followed by another, zeroes from
// inside the transaction's record on.
func TestCrashTornTransaction(t *testing.T) {
	clk := newFakeClock()
	for _, after := range []int{0, 1} {
		img, log, before, seq := crashTxnLog(t, clk, after)
		b := img[log]
		offs := recordOffsets(b)
		at := offs[len(offs)-2-after]
		if offs[len(offs)-1] != len(b) || b[at+headerSize] != 'T' {
			t.Fatalf("the log's record at %d of %d bytes is %q; want the transaction's, 'T'", at, len(b), b[at+headerSize])
		}
		// recovers checks the directory with the log's tail, from the
		// transaction's record on, replaced.
		recovers := func(tail []byte) error {
			damaged := maps.Clone(img)
			damaged[log] = append(slices.Clip(b[:at]), tail...)
			fs := memFSOf(damaged)
			s := NewStore(0, clk)
			d, err := loadDataFS(fs, crashDir, fsyncAlways, s, discardLogger())
			if err != nil {
				return fmt.Errorf("does not start: %v", err)
			}
			defer d.close()
			if got := crashStoreState(s, clk); s.seq != seq-1 || !mapsEqual(got, before) {
				return fmt.Errorf("at change %d with %v; want %d with %v: none of the transaction's ops", s.seq, got, seq-1, before)
			}
			if size, _ := fs.size(log); size != int64(at) {
				return fmt.Errorf("the log is %d bytes; want %d, cut where the transaction's record began", size, at)
			}
			d.start()
			if _, err := s.Set("/after", "1", 0); err != nil || s.seq != seq {
				return fmt.Errorf("a write after: %v, at change %d; want %d", err, s.seq, seq)
			}
			return nil
		}
		tail := b[at:]
		n := offs[len(offs)-1-after] - at // the transaction's record
		cut := func(yield func(string, []byte) bool) {
			for i := 1; i < n; i++ {
				if !yield(fmt.Sprintf("%d of its %d bytes", i, n), tail[:i]) {
					return
				}
			}
		}
		flipped := func(yield func(string, []byte) bool) {
			for i := headerSize; i < n; i++ {
				f := slices.Clone(tail)
				f[i] ^= 0x20
				if !yield(fmt.Sprintf("byte %d of its %d flipped", i, n), f) {
					return
				}
			}
		}
		zeroes := func(yield func(string, []byte) bool) {
			for i := 0; i < n; i++ {
				z := append(slices.Clone(tail[:i]), make([]byte, len(tail)-i)...)
				if !yield(fmt.Sprintf("%d of its %d bytes, then %d zeroes", i, n, len(tail)-i), z) {
					return
				}
			}
		}
		tests := []struct {
			name  string
			tails iter.Seq2[string, []byte]
		}{{"cut", cut}, {"a flipped byte of its body", flipped}, {"zeroes", zeroes}}
		if after > 0 {
			tests = tests[2:]
			tests[0].name = "zeroes over the record after it"
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				var failed []string
				tried := 0
				for what, tail := range tt.tails {
					tried++
					if err := recovers(tail); err != nil {
						failed = append(failed, fmt.Sprintf("%s: %v", what, err))
					}
				}
				if len(failed) > 0 {
					t.Errorf("%d of %d tails fail; the first and last:\n%s\n%s", len(failed), tried, failed[0], failed[len(failed)-1])
				}
			})
		}
	}
}

// TestCrashDamagedTransaction: a transaction's record damaged before the
// end of the log, or cut in a log before the newest, stops the start
// with the file and the offset of the record, and changes no file.
func TestCrashDamagedTransaction(t *testing.T) {
	clk := newFakeClock()
	img, log, _, seq := crashTxnLog(t, clk, 2)
	b := img[log]
	offs := recordOffsets(b)
	i := slices.IndexFunc(offs, func(off int) bool { return off < len(b) && b[off+headerSize] == 'T' })
	if i < 0 || i+2 >= len(offs) {
		t.Fatalf("the log's records at %v: want a transaction's, 'T', before the last", offs)
	}
	at, end := offs[i], offs[i+1]
	body := b[at+headerSize : end]
	_, n := binary.Uvarint(body[1:])
	count := 1 + n // where the count of ops is; the first op's kind follows
	if body[count] != 4 || body[count+1] != 'S' {
		t.Fatalf("the transaction's record %q: want 4 ops, the first a set", body)
	}
	edited := func(edit func(body []byte) []byte) []byte {
		rec := appendRecord(nil, edit(slices.Clone(body)))
		return slices.Concat(b[:at], rec, b[end:])
	}
	flipped := func(i int) []byte {
		c := slices.Clone(b)
		c[i] ^= 0x20
		return c
	}
	for _, tt := range []struct {
		name  string
		log   []byte
		newer bool // a log after this one: this one is not the newest
		want  string
	}{
		{"a flipped byte of its body", flipped(at + headerSize + 3), false, "bad record checksum"},
		{"a flipped byte of its length", flipped(at + 1), false, "bad record header checksum"},
		{"its last byte flipped, in a log before the newest", flipped(end - 1), true, "bad record checksum"},
		{"cut, in a log before the newest", b[:end-3], true, fmt.Sprintf("the file ends inside a record: %d of its %d bytes", end-3-at-headerSize, end-at-headerSize)},
		{"one op, its checksum right", edited(func(body []byte) []byte { body[count] = 1; return body }), false, "malformed transaction record"},
		{"an unknown op, its checksum right", edited(func(body []byte) []byte { body[count+1] = 'Q'; return body }), false, `unknown op 'Q' in a transaction record`},
		{"a byte after its last op, its checksum right", edited(func(body []byte) []byte { return append(body, 0) }), false, "malformed transaction record: bytes after its last op"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			damaged := maps.Clone(img)
			damaged[log] = tt.log
			if tt.newer {
				first := seq + 1000
				damaged[fmt.Sprintf("%s/log-%016x", crashDir, first)] = appendRecord(nil, appendHeader(nil, 'L', first))
			}
			fs := memFSOf(damaged)
			_, err := loadDataFS(fs, crashDir, fsyncAlways, NewStore(0, clk), discardLogger())
			if want := fmt.Sprintf("%s: damaged at offset %d: %s", log, at, tt.want); err == nil || err.Error() != want {
				t.Errorf("starting: %v; want %s", err, want)
			}
			after := image{}
			for p, ino := range fs.names {
				after[p] = fs.inos[ino]
			}
			if after.hash() != damaged.hash() {
				t.Errorf("a start that failed changed the files")
			}
		})
	}
}

// TestCrashStatesSnapshotAheadOfLog: a compaction's snapshot is written
// while writes go on, from a walk of the keys that may see changes
// written after its number and not yet fsynced. Here the walk starts
// only after a write of one key and a transaction of it and a new key
// (-fsync 1s, the default): a power loss that keeps the snapshot and
// loses the transaction's record, not the write's, must not leave the
// transaction in part (replaying the write takes its key back to before
// the transaction; the new key keeps the snapshot's version).
func TestCrashStatesSnapshotAheadOfLog(t *testing.T) {
	_, failures := crashCheck(t, crashWorkloadSnapshotAhead, fsyncSecond, false)
	for i, f := range failures {
		if i == 5 {
			t.Errorf("... and %d more", len(failures)-5)
			break
		}
		t.Error(f)
	}
}

// gatedClock is a clock whose Now, once armed, waits until released the
// first time: the first to ask the time then is a compaction's snapshot
// as its walk of the keys starts (the workload that arms it sets no TTL,
// so that nothing else asks), which holds no lock then.
type gatedClock struct {
	*fakeClock
	armed   atomic.Bool
	once    sync.Once
	hit     chan struct{} // closed when the gate is reached
	release chan struct{}
}

func (c *gatedClock) Now() time.Time {
	if c.armed.Load() {
		c.once.Do(func() {
			close(c.hit)
			<-c.release
		})
	}
	return c.fakeClock.Now()
}

// crashWorkloadSnapshotAhead writes single keys until a rotation starts
// a compaction, holds the compaction at the start of its walk of the
// keys, writes a key and commits a transaction of it and a new key, then
// lets the compaction go on and waits for it.
func crashWorkloadSnapshotAhead(t *testing.T, mode fsyncMode, clk *fakeClock, newLogFirst bool) ([]fsOp, *changeLog) {
	t.Helper()
	gate := &gatedClock{fakeClock: clk, hit: make(chan struct{}), release: make(chan struct{})}
	m := newMemFS()
	seedCrashData(t, m, crashBase)
	s := NewStore(0, gate)
	d, err := loadDataFS(m, crashDir, mode, s, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	d.minCompact = 1 << 8
	d.syncEvery = time.Hour
	d.newLogFirst = newLogFirst
	gate.armed.Store(true)
	d.start()

	cl := &changeLog{}
	set := func(key, value string) {
		e, err := s.Set(key, value, 0)
		if err != nil {
			t.Fatal(err)
		}
		s.seqMu.Lock()
		seq := s.seq
		s.seqMu.Unlock()
		if err := cl.add(seq, loggedChange{key, e}); err != nil {
			t.Fatal(err)
		}
		m.ack(seq)
	}
	for i := 0; ; i++ {
		set(fmt.Sprintf("/s/%d", i%4), fmt.Sprintf(`{"i":%d}`, i))
		if i == 200 {
			<-gate.hit // a rotation was due long ago
		}
		select {
		case <-gate.hit:
		default:
			continue
		}
		break
	}
	// The compaction waits at the start of its walk; a rotation due
	// meanwhile is put off (awaitCompaction is not set).
	set("/s/0", `"before"`)
	tx := &txn{ops: []op{{key: "/s/0", value: `"t0"`}, {key: "/t/new", value: `"t1"`}}}
	if err := s.Commit(tx); err != nil {
		t.Fatal(err)
	}
	if err := cl.add(tx.seq, loggedChange{"/s/0", tx.versions[0]}, loggedChange{"/t/new", tx.versions[1]}); err != nil {
		t.Fatal(err)
	}
	m.ack(tx.seq)
	close(gate.release)
	d.compaction.Wait()
	if err := d.close(); err != nil {
		t.Fatal(err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ops, cl
}

// FuzzRecordReader: whatever a file holds, reading its records never
// panics, every record it returns has the checksum its header says, and
// every error names the file and the offset.
func FuzzRecordReader(f *testing.F) {
	log := appendRecord(nil, appendHeader(nil, 'L', 1))
	log = appendChange(log, change{key: "/a", e: &entry{value: `{"x":1}`, revision: 3}, seq: 1})
	log = appendChange(log, change{key: "/a", why: deleted, seq: 2})
	log = appendChanges(log, []change{
		{key: "/a", e: &entry{value: `1`, ttl: &deadline{at: 5}}, seq: 3},
		{key: "/b", why: deleted, seq: 3},
	})
	f.Add(log)
	f.Add(log[:len(log)-3])
	f.Add(append(slices.Clone(log), make([]byte, 20)...))
	f.Add([]byte{})
	f.Add(make([]byte, headerSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		rr := newRecordReader("/data/log-x", bytes.NewReader(b), int64(len(b)))
		for {
			off := rr.off
			body, err := rr.next()
			if err == io.EOF {
				return
			}
			if err != nil {
				if want := fmt.Sprintf("/data/log-x: damaged at offset %d: ", off); !strings.HasPrefix(err.Error(), want) &&
					!strings.HasPrefix(err.Error(), fmt.Sprintf("/data/log-x: at offset %d: ", off)) {
					t.Fatalf("error %q does not name the file and offset %d", err, off)
				}
				return
			}
			h := b[off : off+headerSize]
			if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(h[4:]) || int(binary.LittleEndian.Uint32(h[0:])) != len(body) ||
				!bytes.Equal(body, b[off+headerSize:off+headerSize+int64(len(body))]) {
				t.Fatalf("record at %d accepted with a checksum that fails", off)
			}
			if isChange(body) {
				changes, expires, err := decodeChanges(body) // never panics
				if err == nil && (len(changes) == 0 || len(expires) != len(changes) || body[0] == 'T' && len(changes) < 2) {
					t.Fatalf("record at %d: %d changes, %d deadlines from %q", off, len(changes), len(expires), body)
				}
			}
			if body[0] == 'B' {
				for rest := body[1:]; len(rest) > 0; {
					var err error
					if _, _, _, rest, err = decodeSnapshotKey(rest); err != nil {
						break
					}
				}
			}
		}
	})
}
