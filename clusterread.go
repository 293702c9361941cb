// How a node (-etcd) knows its view is current: the watch's events come
// in revision order, so once it brought an event at revision R, the view
// holds every change up to R; reads learn etcd's revision in shared round
// trips and wait for the view (or write a fence and wait for it), and a
// watchdog keeps /healthz honest. cluster.go has the design.

package main

import (
	"container/heap"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// checkCurrent writes a fence once a watch is open, and marks the node
// healthy when its event comes: the view has then caught up.
func (j *etcdJournal) checkCurrent() {
	ctx, cancel := context.WithTimeout(j.ctx, j.timeout)
	defer cancel()
	if err := j.waitFence(ctx); err == nil {
		j.proved()
	}
}

// etcdHealthEvery is how long the node goes without finding its view
// current before its watchdog asks etcd itself: a node whose etcd hangs
// (a partition: connections neither answer nor close) is unhealthy
// within about twice that.
const etcdHealthEvery = 2 * time.Second

// proved records that the view was found current: a read or write
// reached etcd and the watch brought the view up to it. With a watch
// open, the node is healthy.
func (j *etcdJournal) proved() {
	j.proven.Store(time.Now().UnixNano())
	if j.healthy.Load() {
		return
	}
	j.mu.Lock()
	if j.watch != nil {
		j.healthy.Store(true)
	}
	j.mu.Unlock()
}

// watchdog keeps healthy (and so /healthz) true only while the node can
// make its view current: when no read or write found it so for
// etcdHealthEvery, it does what a read does, and a failure makes the
// node unhealthy until one succeeds. A watch that closes makes it
// unhealthy at once (setWatch); one that hangs, owing the view a change,
// it closes (unstall), whether or not a request waits for it.
func (j *etcdJournal) watchdog() {
	defer j.workers.Done()
	tick := time.NewTicker(etcdHealthEvery / 2)
	defer tick.Stop()
	probed := make(chan struct{}, 1) // a token: one probe at a time
	probed <- struct{}{}
	var probes sync.WaitGroup
	defer probes.Wait()
	for {
		select {
		case <-j.ctx.Done():
			return
		case <-tick.C:
		}
		j.unstall()
		if time.Since(time.Unix(0, j.proven.Load())) < etcdHealthEvery {
			continue
		}
		select {
		case <-probed:
		default:
			continue // one is under way
		}
		probes.Add(1)
		go func() {
			defer probes.Done()
			// As long as a stall: a read that meets a member that hangs
			// tries it a while (the client's tryTimeout) before the next.
			ctx, cancel := context.WithTimeout(j.ctx, etcdStall)
			defer cancel()
			if err := j.current(ctx); err != nil && j.ctx.Err() == nil {
				j.healthy.Store(false)
			}
			probed <- struct{}{}
		}()
	}
}

// advance records that the view holds every change up to rev, and wakes
// who waits for it.
func (j *etcdJournal) advance(rev int64) {
	j.s.advance(rev)
	j.mu.Lock()
	defer j.mu.Unlock()
	if rev > j.applied {
		j.applied = rev
		j.moved = time.Now()
		for len(j.waiting) > 0 && j.waiting[0].rev <= rev {
			close(heap.Pop(&j.waiting).(*revWaiter).done)
		}
	}
}

// A revWaiter waits for the view to reach rev: done is closed then.
// Each waiter is woken once, when its revision comes: with every write in
// flight waiting for its own, waking them all at each revision cost more
// than the write.
type revWaiter struct {
	rev   int64
	done  chan struct{}
	index int // in revWaiters; -1 once out
}

// revWaiters is a container/heap of waiters, the lowest revision first.
type revWaiters []*revWaiter

func (h revWaiters) Len() int           { return len(h) }
func (h revWaiters) Less(i, k int) bool { return h[i].rev < h[k].rev }
func (h revWaiters) Swap(i, k int) {
	h[i], h[k] = h[k], h[i]
	h[i].index, h[k].index = i, k
}
func (h *revWaiters) Push(x any) {
	w := x.(*revWaiter)
	w.index = len(*h)
	*h = append(*h, w)
}
func (h *revWaiters) Pop() any {
	old := *h
	w := old[len(old)-1]
	old[len(old)-1] = nil
	w.index = -1
	*h = old[:len(old)-1]
	return w
}

// etcdFenceGrace is how long waitApplied waits for the watch before it
// writes a fence. etcd's revision is nearly always that of a change of
// the prefix (an AtomKV write, a fence, an expiry), which the watch
// brings within it; only a write outside the prefix (other data in the
// same etcd) is never brought, and needs the fence. Without the grace,
// a read during writes wrote a fence two times in five.
const etcdFenceGrace = 20 * time.Millisecond

// waitApplied returns once the view holds every change up to rev, or
// ctx's error. Once the view holds a change at rev or after, it holds
// every change up to rev (the watch brings changes in order); if none
// comes within etcdFenceGrace (rev is not a change of the prefix, and
// the prefix is quiet), it writes a fence after rev and waits for that.
func (j *etcdJournal) waitApplied(ctx context.Context, rev int64) error {
	if j.appliedAt() >= rev {
		return nil
	}
	grace, cancel := context.WithTimeout(ctx, etcdFenceGrace)
	err := j.waitUntil(grace, rev)
	cancel()
	if err == nil || ctx.Err() != nil {
		return err
	}
	return j.waitFence(ctx)
}

// waitFence returns once the view holds a fence written after it was
// called, so every change committed before the call.
func (j *etcdJournal) waitFence(ctx context.Context) error {
	rev, err := j.fences.wait(ctx)
	if err != nil {
		return err
	}
	return j.waitUntil(ctx, rev)
}

// etcdStall is how long a watch may keep a change etcd committed before
// it counts as stalled (its member vanished without closing its
// connections) and is opened again (see unstall).
const etcdStall = 3 * time.Second

// waitUntil returns once the view holds every change up to rev, or
// ctx's error.
func (j *etcdJournal) waitUntil(ctx context.Context, rev int64) error {
	j.mu.Lock()
	if j.applied >= rev {
		j.mu.Unlock()
		return nil
	}
	waiter := &revWaiter{rev: rev, done: make(chan struct{})}
	heap.Push(&j.waiting, waiter)
	j.mu.Unlock()
	select {
	case <-waiter.done:
		return nil
	case <-ctx.Done():
		j.mu.Lock()
		applied := j.applied
		if waiter.index >= 0 {
			heap.Remove(&j.waiting, waiter.index)
		}
		j.mu.Unlock()
		if applied >= rev {
			return nil
		}
		return fmt.Errorf("%w: the node's view is behind etcd (at revision %d of %d)", errEtcdUnavailable, applied, rev)
	}
}

// owe records that etcd committed a change of the prefix at rev (a
// write's, a fence's): the watch owes it to the view.
func (j *etcdJournal) owe(rev int64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if rev <= j.applied || rev <= j.owed {
		return
	}
	if j.owed <= j.applied {
		j.moved = time.Now() // the view falls behind from now
	}
	j.owed = rev
}

// unstall closes the watch if it owes the view a change and has brought
// nothing for etcdStall: its member vanished without closing its
// connections (a partition, a hung process). The watch opens again,
// through a member that answers.
//
// A watch that catches up (from a revision before etcd's when it opened:
// the history before a node's state, or what a node missed while cut
// off) gets etcdCatchUp: etcd reads and sends the history in messages of
// up to 1,000 revisions, which can take seconds each to read, encode and
// decode.
func (j *etcdJournal) unstall() {
	j.mu.Lock()
	limit := etcdStall
	if j.applied < j.upTo {
		limit = etcdCatchUp
	}
	w, stalled := j.watch, j.owed > j.applied && time.Since(j.moved) > limit
	applied, owed := j.applied, j.owed
	if stalled {
		j.moved = time.Now() // the next watch gets as long
	}
	j.mu.Unlock()
	if stalled && w != nil {
		j.log.Warn("etcd: the watch brought nothing in time; watching again", "after", limit, "revision", applied, "owed", owed)
		j.c.stats.noteError(w.endpoint, fmt.Errorf("the watch brought nothing for %v: watching again", limit))
		w.Close()
	}
}

// etcdCatchUp is how long a watch that catches up may bring nothing
// before it counts as stalled.
const etcdCatchUp = time.Minute

// appliedAt is the revision the view holds every change up to.
func (j *etcdJournal) appliedAt() int64 {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.applied
}

// fence writes the fence key and returns its revision.
func (j *etcdJournal) fence(ctx context.Context) (int64, error) {
	r, err := etcdCall[etcdAnswer](ctx, j.c, tripFence, "/v3/kv/put", false, &etcdPut{Key: j.key(etcdFence)})
	if err != nil {
		return 0, err
	}
	j.owe(r.Header.Revision)
	return r.Header.Revision, nil
}

// current returns once the view holds every change etcd committed before
// it was called: it learns etcd's revision by a linearizable read, which
// every read that comes meanwhile shares (readBarrier), and waits for the
// view to reach it. So a resume point another node sent, which is a
// revision etcd committed, is reached too.
func (j *etcdJournal) current(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, j.timeout)
	defer cancel()
	rev, err := j.reads.wait(ctx)
	if err == nil {
		err = j.waitApplied(ctx, rev)
	}
	if err != nil {
		return &unavailableError{"etcd is out of reach: this node cannot tell that what it holds is current", err}
	}
	j.proved()
	return nil
}

// revision is etcd's current revision, read linearizably.
func (j *etcdJournal) revision(ctx context.Context) (int64, error) {
	r, err := j.c.rangeKeys(ctx, etcdRange{Key: j.key(etcdMarker), CountOnly: true})
	if err != nil {
		return 0, err
	}
	return r.Header.Revision, nil
}

// readBarrier shares etcd round trips among reads: a read joins the
// round that will start next (never one already under way, which may
// have begun before the read and miss a write acknowledged since), and
// one goroutine runs rounds while reads wait.
type readBarrier struct {
	round   func(context.Context) (int64, error)
	ctx     context.Context // rounds end with it
	timeout time.Duration   // the most a round lasts

	mu      sync.Mutex
	next    *readRound
	running bool
	rounds  atomic.Int64 // run so far, for /metrics
}

type readRound struct {
	done chan struct{}
	rev  int64
	err  error
}

// wait returns the revision of a round that began after it was called.
func (b *readBarrier) wait(ctx context.Context) (int64, error) {
	b.mu.Lock()
	r := b.next
	if r == nil {
		r = &readRound{done: make(chan struct{})}
		b.next = r
	}
	if !b.running {
		b.running = true
		go b.run()
	}
	b.mu.Unlock()
	select {
	case <-r.done:
		return r.rev, r.err
	case <-ctx.Done():
		return 0, fmt.Errorf("%w: %w", errEtcdUnavailable, ctx.Err())
	}
}

// run runs rounds until no read waits. A round is not any waiter's: it
// ends with the journal, or after the longest a request waits.
func (b *readBarrier) run() {
	for {
		b.mu.Lock()
		r := b.next
		b.next = nil
		if r == nil {
			b.running = false
			b.mu.Unlock()
			return
		}
		b.mu.Unlock()
		ctx, cancel := context.WithTimeout(b.ctx, b.timeout)
		b.rounds.Add(1)
		r.rev, r.err = b.round(ctx)
		cancel()
		close(r.done)
	}
}
