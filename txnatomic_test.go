package main

// A transaction is atomic for every observer (SPEC 11), single-key reads
// included: once any read has shown one of its keys changed, every read
// that starts later shows all of them changed. And with -data, when a
// change is applied every change numbered before it shows.

import (
	"fmt"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
)

// TestTxnReadsNeverFractured: a writer commits transactions that set
// /f/a and /f/b to i, i = 1, 2, …, while readers Get one key, then the
// other. A read of one key showing i, followed by a read of the other
// showing less than i, is a fractured read: no single moment had both
// states, and the second read began after the first had seen the
// transaction. Subscribers of / are registered so that publishing, which
// runs while a transaction is applied, takes the time it takes in a
// server with streams. In memory and with -data.
func TestTxnReadsNeverFractured(t *testing.T) {
	t.Run("memory", func(t *testing.T) { fracturedReads(t, NewStore(0, nil)) })
	t.Run("data", func(t *testing.T) {
		s, _ := openTestData(t, t.TempDir(), fsyncNever, 1<<40, nil)
		fracturedReads(t, s)
	})
}

func fracturedReads(t *testing.T, s *Store) {
	for range 32 {
		sub := &subscription{path: "/", q: &coalescer{}} // two keys: at most two events pending
		s.Subscribe(sub, fromNow, nil)
		t.Cleanup(func() { s.Unsubscribe(sub) })
	}
	value := func(key string) int {
		e := s.Get(key)
		if e == nil {
			return 0
		}
		n, _ := strconv.Atoi(e.value)
		return n
	}
	const txns = 1_000
	var done atomic.Bool
	var fractured atomic.Int64
	var example atomic.Value
	var wg sync.WaitGroup
	for r := range 2 {
		first, second := "/f/a", "/f/b"
		if r == 1 {
			first, second = second, first
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !done.Load() {
				x := value(first)
				if y := value(second); y < x {
					fractured.Add(1)
					example.Store(fmt.Sprintf("%s read %d, then %s read %d", first, x, second, y))
				}
				runtime.Gosched() // the writer (and the flusher) run too on a small machine
			}
		}()
	}
	i := 1
	for ; i <= txns && fractured.Load() == 0; i++ { // the first fracture is enough
		v := strconv.Itoa(i)
		tx := &txn{ops: []op{{key: "/f/a", value: v}, {key: "/f/b", value: v}}}
		if err := s.Commit(tx); err != nil {
			t.Fatal(err)
		}
	}
	done.Store(true)
	wg.Wait()
	if n := fractured.Load(); n > 0 {
		t.Errorf("%d fractured reads within %d transactions of two keys, e.g. %s: a Get after another showed part of a transaction", n, i-1, example.Load())
	}
}

// TestTxnDataAppliedInOrder: with -data, a batch of the log holds a
// single write of /a (S1), a transaction that checked /a at the revision
// S1 gave it and set /b (S2), and a later single write of /a (S3). When
// the transaction is applied, /a must show S1 (or later): every change
// numbered before S2 is applied before it, and S2 was decided on S1. If
// S1 is skipped because S3 supersedes it, and S2 applied before S3, a
// reader at that moment sees /b set by a transaction whose check on /a
// held, beside an /a that never had that revision: a state no order of
// the three changes gives, and a GET of /a whose X-Seq (S2) says S1 is
// reflected when it is not.
func TestTxnDataAppliedInOrder(t *testing.T) {
	s := NewStore(0, nil)
	d, err := loadData(t.TempDir(), fsyncNever, s, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.close() })
	// The flusher is not started: the three changes wait in one batch.
	pending := func(key, value string) func() bool { // key's change to value is decided, not written
		return func() bool {
			v, ok := s.keys.Load(key)
			if !ok {
				return false
			}
			sl := v.(*slot)
			sl.mu.Lock()
			defer sl.mu.Unlock()
			e, _, ok := d.pending(sl)
			return ok && e.value == value
		}
	}
	errs := make(chan error, 3)
	commit := func(tx *txn) { go func() { errs <- s.Commit(tx) }() }

	commit(single(op{key: "/a", value: "1"}, nil)) // S1: /a at 0
	waitFor(t, "S1 decided", pending("/a", "1"))
	s.seqMu.Lock()
	seq1 := s.seq
	s.seqMu.Unlock()
	commit(&txn{checks: []check{{"/a", 0}}, ops: []op{{key: "/b", value: "2"}, {key: "/c", value: "2"}}}) // S2
	waitFor(t, "S2 decided", pending("/b", "2"))
	commit(single(op{key: "/a", value: "3"}, nil)) // S3: /a at 1
	waitFor(t, "S3 decided", pending("/a", "3"))

	var seen []string
	s.publish = func(c change) { // the flusher's goroutine alone calls it
		if c.key == "/b" {
			var e *entry // what a reader sees (Get may wait for the change being applied)
			if v, ok := s.keys.Load("/a"); ok {
				e = v.(*slot).load()
			}
			seen = append(seen, fmt.Sprintf("/a at revision %d when S%d is applied", revisionOf(e), c.seq-seq1+1))
		}
		s.subs.publish(c)
	}
	d.start()
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatalf("commit: %v", err)
		}
	}
	if len(seen) != 1 || seen[0] != "/a at revision 0 when S2 is applied" {
		t.Errorf("%v; want /a at revision 0 (S1's) when S2, decided on it, is applied", seen)
	}
	if got := s.Get("/a"); revisionOf(got) != 1 || got.value != "3" {
		t.Errorf("/a at the end: %v; want 3 at revision 1", got)
	}
}
