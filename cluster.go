// The cluster (-etcd, SPEC section 12): this server as one node of any
// number serving one keyspace, whose store of record is an etcd cluster.
// etcdJournal is the node's journal: a write is an etcd txn (a put or a
// delete when it is one on no condition), decided and numbered by etcd
// (its revision is the change's seq); the change comes
// back through the node's one watch of the prefix and is applied
// (Store.replay) as on every other node, by the code that replays the
// -data log at start. Reads wait until the view holds every change etcd
// committed before they began (current), so they are linearizable.
//
// How a node knows its view holds every change up to a revision: the
// watch's events come in revision order, so once it has brought an event
// at revision R or later, it has brought every change up to R. etcd's
// revision is nearly always a change of the prefix, which the watch
// brings; when none comes within a grace (the revision is another
// prefix's: etcd holds other data), the node writes a fence (the key
// <prefix>/\x00fence) and waits for its event. (etcd's progress requests
// would save the write, but in etcd 3.4.23 a progress report may come
// before events of lower revisions, etcd-io/etcd#15220: it says where
// etcd was, not what the watch sent.)
//
// A watch can hang without closing (its member cut off by a partition):
// one that owes the view a change it knows etcd committed, and brings
// nothing for a while, is closed and opened again; a watchdog checks it,
// and probes etcd as a read does when no request has, which /healthz
// reports.
//
// How AtomKV's model maps onto etcd's:
//
//	key /a/b                 etcd key <prefix>/a/b
//	revision                 version - 1 (a new key: version 1, revision 0)
//	seq                      the change's revision (mod_revision)
//	CAS, checks              compare version == revision+1; missing: create_revision == 0
//	a transaction            one etcd txn: one revision for all its events
//	value, no TTL            the JSON text as it is
//	value with a TTL         0x00, the deadline (8 bytes, Unix ns, big-endian), the JSON text
//	since, reset             the node's history of the watch; past it, a reset
//
// TTL: a node expires a key at its deadline itself, with a txn that
// deletes it only if it is still that version (compare mod_revision) and
// puts the marker key <prefix>/\x00expired in the same revision: on the
// watch, a DELETE whose revision holds the marker is an expiry, any other
// a delete. Several nodes racing to expire a key make one change. So that
// keys expire when no node runs, each is also attached to a lease that
// the node shares among the keys whose deadlines fall in the same second
// (never one lease per key), granted to end a few seconds after that
// second: if it ends first (no node ran), etcd deletes the keys, and a
// DELETE of a leased key past its deadline without the marker counts as
// an expiry too.

package main

import (
	"bytes"
	"container/heap"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// etcdMaxRequest is etcd's --max-request-bytes by default: a txn past it
// (as the node encodes it, plus room for the request's framing) is
// refused with 413 before it is sent.
const etcdMaxRequest = 1536 << 10

// etcdLeaseGrace is how long after the end of its second a lease of
// deadlines ends: nodes expire keys at their deadlines; the lease is for
// when none runs.
const etcdLeaseGrace = 3

// etcdJournal is the journal of a node of a cluster.
type etcdJournal struct {
	s       *Store
	c       *etcdClient
	prefix  string // etcd's key of AtomKV's key k is prefix+k
	log     *slog.Logger
	timeout time.Duration // the most a request waits for etcd (-write-timeout)

	ctx     context.Context // ends with close
	stop    context.CancelFunc
	workers sync.WaitGroup // the watch's goroutine and the watchdog

	mu      sync.Mutex
	applied int64        // the view holds every change up to this revision
	waiting revWaiters   // who waits for applied to reach a revision, soonest first
	owed    int64        // the last revision of the prefix etcd said it committed (a write's, a fence's): the watch owes it
	moved   time.Time    // when applied last moved, or the view last fell behind owed: a stalled watch moves it no more
	watch   *etcdWatch   // the watch open now, which a stall closes
	upTo    int64        // etcd's revision when it opened: below it, the watch catches up
	loaded  int64        // the revision the start-up range read; changes up to it only go to the history
	healthy atomic.Bool  // the watch is open, and the last try to find the view current succeeded
	proven  atomic.Int64 // when the view was last found current (Unix ns)

	reads  readBarrier // rounds of linearizable reads of etcd's revision
	fences readBarrier // rounds of fence writes
	leases leaseCache
}

// etcdMarker is the etcd key, under the prefix, that an expiry puts in
// the revision of its delete, and etcdFence the key a node writes to know
// its watch is current; no AtomKV key maps to either (no component starts
// with a control character).
const (
	etcdMarker = "/\x00expired"
	etcdFence  = "/\x00fence"
)

// openCluster makes s the view of the keyspace under cfg.etcdPrefix in
// the etcd cluster at cfg.etcd: it checks what etcd accepts, reads the
// whole prefix at one revision, and follows it from there with one
// watch. It returns once the view is current.
func openCluster(cfg config, s *Store, log *slog.Logger) (*etcdJournal, error) {
	var tlsConf *tls.Config
	if cfg.etcdCA != "" || cfg.etcdCert != "" || cfg.etcdKey != "" {
		conf, err := etcdTLSConfig(cfg.etcdCA, cfg.etcdCert, cfg.etcdKey)
		if err != nil {
			return nil, err
		}
		tlsConf = conf
	}
	c, err := newEtcdClient(strings.Split(cfg.etcd, ","), tlsConf)
	if err != nil {
		return nil, fmt.Errorf("-etcd: %w", err)
	}
	j := &etcdJournal{s: s, c: c, prefix: cfg.etcdPrefix, log: log, timeout: cfg.writeTimeout}
	j.ctx, j.stop = context.WithCancel(context.Background())
	j.reads = readBarrier{round: j.revision, ctx: j.ctx, timeout: j.timeout}
	j.fences = readBarrier{round: j.fence, ctx: j.ctx, timeout: j.timeout}
	j.leases.c = c
	// Each step of the start must make progress within this; the whole
	// may take longer (a prefix of millions of keys, its history).
	timeout := max(cfg.writeTimeout, 10*time.Second)
	ctx, cancel := context.WithTimeout(j.ctx, timeout)
	defer cancel()
	if err := j.checkTxnOps(ctx, cfg.maxTxnOps); err != nil {
		return nil, err
	}
	s.expiry.hold() // until the view is loaded
	defer s.expiry.resume()
	if err := j.load(timeout); err != nil {
		return nil, fmt.Errorf("-etcd: reading %s: %w", j.prefix, err)
	}
	s.journal = j // before any request: the listener starts after
	j.workers.Add(2)
	go j.follow(max(1, j.loaded-int64(s.history.max)+1))
	go j.watchdog()
	for applied := j.appliedAt(); ; {
		ctx, cancel := context.WithTimeout(j.ctx, max(timeout, etcdCatchUp))
		err := j.waitApplied(ctx, j.loaded)
		cancel()
		if err == nil {
			return j, nil
		}
		if now := j.appliedAt(); now > applied {
			applied = now // the history before the state still comes
			continue
		}
		j.close()
		return nil, fmt.Errorf("-etcd: watching %s: %w", j.prefix, err)
	}
}

// checkTxnOps makes sure etcd takes a transaction of -max-txn-ops ops
// (and as many checks: etcd counts compares against its --max-txn-ops
// too): it sends that many compares of a key no write ever makes, which
// fail, so nothing is written.
func (j *etcdJournal) checkTxnOps(ctx context.Context, n int) error {
	probe := etcdTxn{Compare: make([]etcdCompare, n)}
	for i := range probe.Compare {
		probe.Compare[i] = etcdCompare{Target: "VERSION", Key: j.key(etcdMarker + "/probe"), Version: 1 << 40}
	}
	_, err := j.c.txn(ctx, probe)
	switch {
	case errors.Is(err, errEtcdTooManyOps):
		return fmt.Errorf("-max-txn-ops %d is more than etcd takes (its --max-txn-ops): lower it, or raise etcd's", n)
	case err != nil:
		return fmt.Errorf("-etcd: %w", err)
	}
	return nil
}

// key is the etcd key of AtomKV's key k.
func (j *etcdJournal) key(k string) []byte { return []byte(j.prefix + k) }

// keyRange is the etcd range of every AtomKV key.
func (j *etcdJournal) keyRange() (key, end []byte) {
	key = j.key("/")
	return key, etcdPrefixEnd(key)
}

// load reads every key under the prefix at one revision into the store.
// The pages are read at the revision of the first; if etcd compacts it
// away before the last, the prefix is read again, at a later revision,
// and what the earlier reads put in place that etcd no longer holds
// goes.
func (j *etcdJournal) load(timeout time.Duration) error {
	// A page at a time: each page must come within timeout, the whole
	// may take longer.
	ctx, cancel := context.WithCancel(j.ctx)
	defer cancel()
	stalled := time.AfterFunc(timeout, cancel)
	defer stalled.Stop()
	key, end := j.keyRange()
	for attempt := 0; ; attempt++ {
		var seen map[string]bool // the keys read, once a read was cut short
		if attempt > 0 {
			seen = make(map[string]bool, j.s.Len())
		}
		rev, err := j.c.rangePages(ctx, key, end, 1000, func(kvs []etcdKV) error {
			stalled.Reset(timeout)
			for _, kv := range kvs {
				if k, e, ok := j.decode(kv); ok {
					// Expired or not: the node expires it, as it would
					// any key, once the view is loaded.
					j.s.restore(k, e, 0)
					if seen != nil {
						seen[k] = true
					}
				}
			}
			return nil
		})
		if errors.Is(err, errEtcdCompacted) {
			continue
		}
		if err != nil && ctx.Err() != nil {
			return fmt.Errorf("no page in %v: %w", timeout, err)
		}
		if err != nil {
			return err
		}
		if seen != nil {
			for k := range j.held() {
				if !seen[k] {
					j.s.restore(k, nil, 0)
				}
			}
		}
		j.loaded = rev
		j.s.startSequence(rev)
		return nil
	}
}

// held yields every key the view holds, expired or not.
func (j *etcdJournal) held() iter.Seq2[string, *entry] {
	return func(yield func(string, *entry) bool) {
		var keys []string
		var entries []*entry
		j.s.keys.Range(func(k, v any) bool {
			if e := v.(*slot).load(); e != nil {
				keys, entries = append(keys, k.(string)), append(entries, e)
			}
			return true
		})
		for i, k := range keys {
			if !yield(k, entries[i]) {
				return
			}
		}
	}
}

// decode reads an etcd key as the view holds it: its AtomKV key and
// version (with its deadline, whose seq is the version's revision). ok
// is false for what is not an AtomKV key (the marker).
func (j *etcdJournal) decode(kv etcdKV) (key string, e *entry, ok bool) {
	if len(kv.Key) <= len(j.prefix) || !bytes.HasPrefix(kv.Key, []byte(j.prefix)) {
		return "", nil, false
	}
	// The key alone: the view keeps this string, and the prefix's bytes
	// in it would cost every key as much again.
	key = string(kv.Key[len(j.prefix):])
	if strings.HasPrefix(key, "/\x00") {
		return "", nil, false
	}
	value, at := decodeEtcdValue(kv.Value)
	e = &entry{value: value, revision: kv.Version - 1}
	if at != 0 {
		e.ttl = &deadline{at: at, key: key, index: -1, seq: kv.ModRevision}
	}
	return key, e, true
}

// encodeEtcdValue is what etcd holds of a version: its JSON text, after
// its deadline if it has one. No JSON text begins with a 0 byte.
func encodeEtcdValue(e *entry) []byte {
	if e.ttl == nil {
		return []byte(e.value)
	}
	b := make([]byte, 9, 9+len(e.value))
	binary.BigEndian.PutUint64(b[1:], uint64(e.ttl.at))
	return append(b, e.value...)
}

// decodeEtcdValue undoes encodeEtcdValue: the value and its deadline (0:
// none).
func decodeEtcdValue(b []byte) (value string, deadline int64) {
	if len(b) >= 9 && b[0] == 0 {
		return string(b[9:]), int64(binary.BigEndian.Uint64(b[1:9]))
	}
	return string(b), 0
}

// follow is the node's one watch of the prefix, from revision from on:
// it applies what comes, and watches again from the revision after the
// last one applied whenever the stream ends, until the journal closes.
func (j *etcdJournal) follow(from int64) {
	defer j.workers.Done()
	key, end := j.keyRange()
	restart := true // the history starts at from: it holds nothing before
	for wait := time.Duration(0); j.ctx.Err() == nil; wait = min(max(2*wait, 50*time.Millisecond), 2*time.Second) {
		select {
		case <-time.After(wait):
		case <-j.ctx.Done():
			return
		}
		w, err := j.c.watch(j.ctx, etcdWatchCreate{Key: key, RangeEnd: end, StartRevision: from, ProgressNotify: true})
		var compacted *etcdCompactedError
		if errors.As(err, &compacted) {
			from, restart = j.compacted(compacted.Revision)
			continue
		}
		if err != nil {
			continue
		}
		if restart && from <= j.loaded {
			j.s.historyFrom(from) // the changes before the state read at start come first
		}
		restart = false
		// The watch outlives the context it was opened with (etcdClient
		// ties only the opening to it): close ends it here, or next would
		// wait for a message a quiet prefix never sends.
		unhook := context.AfterFunc(j.ctx, func() { w.Close() })
		j.setWatch(w)
		go j.checkCurrent()
		wait = 0
		for {
			r, err := w.next()
			if errors.As(err, &compacted) {
				// etcd says so on the stream, after "created", not when
				// the watch opens.
				from, restart = j.compacted(compacted.Revision)
				break
			}
			if err != nil {
				break
			}
			if last := j.receive(r, w.header.Revision); last > 0 {
				from = last + 1
			}
		}
		unhook()
		j.setWatch(nil)
		w.Close()
	}
}

// setWatch records the watch open now (nil: none), which a stall
// closes; without one the node is not healthy.
func (j *etcdJournal) setWatch(w *etcdWatch) {
	j.mu.Lock()
	j.watch = w
	if w == nil {
		j.healthy.Store(false)
	} else {
		j.upTo, j.moved = w.header.Revision, time.Now()
	}
	j.mu.Unlock()
}

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

// receive applies a watch message: each revision's events as one change
// (a transaction's several keys share one), or, for a change the view
// already holds (up to the revision the start-up read), only its keys to
// the history. It returns the last revision it brought (0 for a message
// without events, whose revision says nothing sure: see the file's
// comment).
func (j *etcdJournal) receive(r *etcdWatchResponse, _ int64) int64 {
	last := int64(0)
	for len(r.Events) > 0 {
		rev := r.Events[0].KV.ModRevision
		n := 1
		for n < len(r.Events) && r.Events[n].KV.ModRevision == rev {
			n++
		}
		j.apply(rev, r.Events[:n])
		r.Events, last = r.Events[n:], rev
	}
	if last > 0 {
		j.advance(last)
	}
	return last
}

// apply applies the events of one revision.
func (j *etcdJournal) apply(rev int64, events []etcdEvent) {
	expiry := false
	for _, ev := range events {
		if ev.Type != "DELETE" && string(ev.KV.Key) == j.prefix+etcdMarker {
			expiry = true
		}
	}
	now := j.s.now()
	changes := make([]change, 0, len(events))
	for _, ev := range events {
		if ev.Type == "DELETE" {
			key, _, ok := j.decode(ev.KV)
			if !ok {
				continue
			}
			why := deleted
			if expiry || j.pastDeadline(key, now) {
				why = expired // the node's expiry, or the lease's, when no node ran in time
			}
			changes = append(changes, change{key: key, why: why, seq: rev})
			continue
		}
		if key, e, ok := j.decode(ev.KV); ok {
			changes = append(changes, change{key: key, e: e, seq: rev})
		}
	}
	if len(changes) == 0 {
		return
	}
	if rev <= j.loaded {
		j.s.remember(changes) // in the state read at start already
		return
	}
	j.s.replay(changes)
}

// pastDeadline reports whether the view holds key at a version whose
// deadline is past: a delete of it without the marker is its lease's
// (every version with a deadline has one), when no node expired it in
// time. The watch brings no previous version with a delete (prev_kv):
// etcd reads it from its history for every event, which costs about as
// much as the write; the view has it.
func (j *etcdJournal) pastDeadline(key string, now int64) bool {
	e := j.holds(key)
	return e != nil && e.ttl != nil && e.ttl.at <= now
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

// compacted returns where to watch from when etcd compacted its history
// up to rev, past where the watch asked to start. While the node fills
// its history with the changes before the state it read at start (rev at
// most that state's revision), the history begins at rev (restart):
// the node cannot know what changed before. Past the state, the node
// reads the prefix again (resync), and the history goes on through the
// difference; if the watch had not yet brought every change up to the
// state, what it brought of them is no history (it has a gap), and the
// history begins after the state.
func (j *etcdJournal) compacted(rev int64) (from int64, restart bool) {
	if rev <= j.loaded {
		return rev, true
	}
	if j.appliedAt() < j.loaded {
		j.s.historyFrom(j.loaded + 1)
	}
	return j.resync(rev), false
}

// resync follows a watch that could not start where it asked, because
// etcd compacted its history (the node was cut off from etcd for long):
// it reads the prefix again at etcd's revision and applies the
// difference to the view as one change, numbered with that revision.
// Clients resuming from before it get every key it changed, as for any
// change; the history before it is what etcd compacted. It returns the
// revision to watch from.
func (j *etcdJournal) resync(compactedAt int64) int64 {
	for j.ctx.Err() == nil {
		ctx, cancel := context.WithTimeout(j.ctx, j.timeout)
		seen := make(map[string]bool)
		var changes []change
		key, end := j.keyRange()
		rev, err := j.c.rangePages(ctx, key, end, 1000, func(kvs []etcdKV) error {
			for _, kv := range kvs {
				k, e, ok := j.decode(kv)
				if !ok {
					continue
				}
				seen[k] = true
				if cur := j.holds(k); cur == nil || cur.revision != e.revision || cur.value != e.value || deadlineOf(cur) != deadlineOf(e) {
					changes = append(changes, change{key: k, e: e})
				}
			}
			return nil
		})
		cancel()
		if err != nil {
			j.log.Warn("etcd: reading the prefix again after a compaction", "err", err)
			select {
			case <-time.After(time.Second):
			case <-j.ctx.Done():
			}
			continue
		}
		// What etcd no longer holds: deleted, or expired (the view may
		// hold a key past its deadline that another node expired).
		now := j.s.now()
		for k, e := range j.held() {
			if !seen[k] {
				why := deleted
				if e.ttl != nil && e.ttl.at <= now {
					why = expired
				}
				changes = append(changes, change{key: k, why: why})
			}
		}
		j.log.Warn("etcd: history compacted while the node could not watch; read the prefix again", "compacted", compactedAt, "revision", rev, "changed", len(changes))
		if len(changes) > 0 {
			for i := range changes {
				changes[i].seq = rev
			}
			j.s.replay(changes)
		}
		j.advance(rev)
		return rev + 1
	}
	return 0
}

// etcdFenceGrace is how long waitApplied waits for the watch before it
// writes a fence. etcd's revision is nearly always that of a change of
// the prefix (an AtomKV write, a fence, an expiry), which the watch
// brings within it; only a write outside the prefix (other data in the
// same etcd) is never brought, and needs the fence. Without the grace,
// a read during writes wrote a fence two times in five.
const etcdFenceGrace = 20 * time.Millisecond

// holds is the version the view holds of key, expired or not; nil if
// none.
func (j *etcdJournal) holds(key string) *entry {
	if v, ok := j.s.keys.Load(key); ok {
		return v.(*slot).load()
	}
	return nil
}

// deadlineOf is e's deadline (Unix ns), 0 if it has none.
func deadlineOf(e *entry) int64 {
	if e.ttl == nil {
		return 0
	}
	return e.ttl.at
}

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
	w, err := j.send(ctx, etcdTxn{Success: []etcdOp{{Put: &etcdPut{Key: j.key(etcdFence)}}}})
	if err != nil {
		return 0, err
	}
	j.owe(w.revision)
	return w.revision, nil
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

// commit sends t to etcd as one txn, and returns once the view has
// applied it. A key the view holds expired (its deadline passed, its
// expiry not yet made) is expired first, as a change of its own.
func (j *etcdJournal) commit(t *txn) error {
	ctx, cancel := context.WithTimeout(j.ctx, j.timeout)
	defer cancel()
	if err := j.fits(t); err != nil {
		return err
	}
	var creates int64
	for _, o := range t.ops {
		if cur := j.s.Get(o.key); cur == nil && !o.del {
			creates++
		}
	}
	if !j.s.reserve(creates) {
		return errFull
	}
	defer j.s.creating.Add(-creates)
	for attempt := 0; ; attempt++ {
		j.expireFirst(ctx, t)
		req, versions, err := j.txnOf(ctx, t)
		if err != nil {
			return err
		}
		resp, err := j.send(ctx, req)
		switch {
		case errors.Is(err, errEtcdLeaseNotFound) && attempt == 0:
			j.leases.forget()
			continue
		case err != nil:
			return etcdFailure(err)
		case !resp.succeeded:
			conflict, stale := j.conflicts(t, resp.failure)
			if len(stale) > 0 && attempt < 3 {
				// A key etcd holds expired failed a check that it is
				// missing: expired first (the view may not hold it
				// yet), then again.
				for _, kv := range stale {
					j.expireVersion(ctx, strings.TrimPrefix(string(kv.Key), j.prefix), kv.ModRevision)
				}
				continue
			}
			return conflict
		}
		j.results(t, resp, versions)
		if j.changed(t) {
			j.owe(t.seq)
			return j.wrote(j.waitUntil(ctx, t.seq)) // its own events bring the view there
		}
		return j.wrote(j.waitApplied(ctx, t.seq)) // etcd's revision when it found nothing to change
	}
}

// fits refuses a transaction etcd would refuse for its size.
func (j *etcdJournal) fits(t *txn) error {
	n := 256
	for _, c := range t.checks {
		n += 2*(len(j.prefix)+len(c.key)) + 64 // its compare and its range on failure
	}
	for _, o := range t.ops {
		n += len(j.prefix) + len(o.key) + len(o.value) + 64
	}
	if n > etcdMaxRequest {
		return &tooLargeError{"transaction, as etcd takes it,", etcdMaxRequest}
	}
	return nil
}

// etcdFailure is what a client is told of a failed etcd request.
func etcdFailure(err error) error {
	switch {
	case errors.Is(err, errEtcdTooLarge):
		return &tooLargeError{"request, as etcd takes it,", etcdMaxRequest}
	case errors.Is(err, errEtcdTooManyOps):
		return fmt.Errorf("too many ops for etcd: %w", err)
	case errors.Is(err, errOutcomeUnknown):
		return &unavailableError{"etcd did not say whether it applied the write: its outcome is unknown (it may or may not have been applied)", err}
	}
	return &unavailableError{"etcd is unavailable: nothing was applied", err}
}

// unavailableError is a request the server could not carry out now: 503,
// with what the client should know.
type unavailableError struct {
	msg string
	err error
}

func (e *unavailableError) Error() string { return e.msg }
func (e *unavailableError) Unwrap() error { return e.err }

// expireFirst expires, each as its own change, the keys of t that the
// view holds past their deadlines: etcd still has them, and a write to
// one must start it again at revision 0.
func (j *etcdJournal) expireFirst(ctx context.Context, t *txn) {
	expire := func(key string) {
		if v, ok := j.s.keys.Load(key); ok {
			if e := v.(*slot).load(); e != nil && j.s.unexpired(e) == nil {
				j.expireVersion(ctx, key, e.ttl.seq)
			}
		}
	}
	for _, c := range t.checks {
		expire(c.key)
	}
	for _, o := range t.ops {
		expire(o.key)
	}
}

// txnOf is t as an etcd txn: a compare per check, a put or delete per
// op, and on failure a range per check, to answer with; and of each op
// the version a set writes (its revision still to learn), nil for a
// delete.
func (j *etcdJournal) txnOf(ctx context.Context, t *txn) (req etcdTxn, versions []*entry, err error) {
	for _, c := range t.checks {
		cmp := etcdCompare{Target: "VERSION", Key: j.key(c.key), Version: c.revision + 1}
		if c.revision == noRevision {
			cmp = etcdCompare{Target: "CREATE", Key: j.key(c.key)} // create_revision 0: missing
		}
		req.Compare = append(req.Compare, cmp)
		req.Failure = append(req.Failure, etcdOp{Range: &etcdRange{Key: j.key(c.key)}})
	}
	now := j.s.now()
	versions = make([]*entry, len(t.ops))
	for i, o := range t.ops {
		if o.del {
			req.Success = append(req.Success, etcdOp{Delete: &etcdDelete{Key: j.key(o.key), PrevKV: true}})
			continue
		}
		e := j.s.newEntry(o.key, o.value, 0, o.ttl)
		versions[i] = e
		put := &etcdPut{Key: j.key(o.key), Value: encodeEtcdValue(e), PrevKV: true}
		if e.ttl != nil {
			lease, err := j.leases.of(ctx, e.ttl.at, now)
			if err != nil {
				return req, nil, etcdFailure(err)
			}
			put.Lease = lease
		}
		req.Success = append(req.Success, etcdOp{Put: put})
	}
	return req, versions, nil
}

// etcdWritten is what etcd answered a write: its revision, whether its
// compares held, then of each op the key's version before (nil: none),
// else of each check the key's version now (nil: missing).
type etcdWritten struct {
	revision  int64
	succeeded bool
	prev      []*etcdKV
	failure   []*etcdKV
}

// send runs req: as a put or a delete when it is one on no condition
// (most writes: POST, DELETE), which etcd 3.4 runs at about half the
// cost of the same in a txn; else as a txn.
func (j *etcdJournal) send(ctx context.Context, req etcdTxn) (*etcdWritten, error) {
	type header struct {
		Header etcdHeader `json:"header"`
	}
	if len(req.Compare) == 0 && len(req.Success) == 1 {
		switch op := req.Success[0]; {
		case op.Put != nil:
			r, err := etcdCall[struct {
				header
				PrevKV *etcdKV `json:"prev_kv"`
			}](ctx, j.c, "/v3/kv/put", false, op.Put)
			if err != nil {
				return nil, err
			}
			return &etcdWritten{revision: r.Header.Revision, succeeded: true, prev: []*etcdKV{r.PrevKV}}, nil
		case op.Delete != nil:
			r, err := etcdCall[struct {
				header
				PrevKVs []etcdKV `json:"prev_kvs"`
			}](ctx, j.c, "/v3/kv/deleterange", false, op.Delete)
			if err != nil {
				return nil, err
			}
			w := &etcdWritten{revision: r.Header.Revision, succeeded: true, prev: []*etcdKV{nil}}
			if len(r.PrevKVs) > 0 {
				w.prev[0] = &r.PrevKVs[0]
			}
			return w, nil
		}
	}
	resp, err := j.c.txn(ctx, req)
	if err != nil {
		return nil, err
	}
	w := &etcdWritten{revision: resp.Header.Revision, succeeded: resp.Succeeded}
	for _, r := range resp.Responses {
		var kv *etcdKV
		switch {
		case r.Put != nil:
			kv = r.Put.PrevKV
		case r.Delete != nil && len(r.Delete.PrevKVs) > 0:
			kv = &r.Delete.PrevKVs[0]
		case r.Range != nil && len(r.Range.KVs) > 0:
			kv = &r.Range.KVs[0]
		}
		if resp.Succeeded {
			w.prev = append(w.prev, kv)
		} else {
			w.failure = append(w.failure, kv)
		}
	}
	return w, nil
}

// results records what a write that held did: its revision, and of each
// op the version written (versions, whose revisions it sets: one past
// the one before, 0 if new) and whether its key held a value.
func (j *etcdJournal) results(t *txn, w *etcdWritten, versions []*entry) {
	t.seq = w.revision
	t.existed = make([]bool, len(t.ops))
	t.versions = versions
	for i, prev := range w.prev {
		t.existed[i] = prev != nil
		if e := versions[i]; e != nil && prev != nil {
			e.revision = prev.Version // the new version's, less one
		}
	}
}

// wrote is what a client is told of a write etcd committed that the
// view did not reach in time.
func (j *etcdJournal) wrote(err error) error {
	if err != nil {
		return &unavailableError{"etcd committed the write, but this node's view did not reach it in time", err}
	}
	return nil
}

// changed reports whether a txn that held changed a key, so that its
// events will come on the watch.
func (j *etcdJournal) changed(t *txn) bool {
	for i, o := range t.ops {
		if !o.del || t.existed[i] {
			return true
		}
	}
	return false
}

// conflicts reads a txn that failed: every check that does not hold, at
// the version etcd holds. stale are the keys, as etcd holds them, that
// failed a check for a missing key because etcd holds them expired: they
// must be expired first.
func (j *etcdJournal) conflicts(t *txn, failure []*etcdKV) (_ *conflictError, stale []*etcdKV) {
	conflict := new(conflictError)
	for i, c := range t.checks {
		var cur *entry
		if kv := failure[i]; kv != nil {
			_, cur, _ = j.decode(*kv)
		}
		if cur != nil && j.s.unexpired(cur) == nil {
			if c.revision == noRevision {
				stale = append(stale, failure[i])
			}
			cur = nil
		}
		if revisionOf(cur) != c.revision {
			conflict.conflicts = append(conflict.conflicts, item{c.key, cur})
			conflict.at = append(conflict.at, i)
		}
	}
	if len(conflict.conflicts) == 0 {
		// Every check holds now: a key changed between the txn and the
		// reads (the reads are the failure branch, at the txn's
		// revision, so this is an expired key). Report the first.
		conflict.conflicts = []item{{t.checks[0].key, nil}}
		conflict.at = []int{0}
	}
	return conflict, stale
}

// expire ends d's key at its deadline, as every node tries to: one txn
// deletes it if it is still that version, with the marker.
func (j *etcdJournal) expire(d *deadline) {
	v, ok := j.s.keys.Load(d.key)
	if !ok {
		return
	}
	if e := v.(*slot).load(); e == nil || e.ttl != d {
		return // written or gone since
	}
	ctx, cancel := context.WithTimeout(j.ctx, j.timeout)
	defer cancel()
	if err := j.expireVersion(ctx, d.key, d.seq); err != nil && j.ctx.Err() == nil {
		// etcd is out of reach: the key stays unreadable, and its
		// expiry is tried again.
		time.AfterFunc(time.Second, func() { j.expire(d) })
	}
}

// expireVersion deletes key if etcd still holds it at revision seq, with
// the marker that tells the watch it expired.
func (j *etcdJournal) expireVersion(ctx context.Context, key string, seq int64) error {
	_, err := j.c.txn(ctx, etcdTxn{
		Compare: []etcdCompare{{Target: "MOD", Key: j.key(key), ModRevision: seq}},
		Success: []etcdOp{
			{Delete: &etcdDelete{Key: j.key(key)}},
			{Put: &etcdPut{Key: j.key(etcdMarker), Value: []byte(key)}},
		},
	})
	return err
}

// close stops the watch and the watchdog.
func (j *etcdJournal) close() error {
	j.stop()
	j.workers.Wait()
	j.c.close()
	return nil
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

// leaseCache holds the node's leases, one per second of deadlines.
type leaseCache struct {
	c  *etcdClient
	mu sync.Mutex // held while a lease is granted: one grant per second at most
	m  map[int64]int64
}

// of returns the lease of deadlines in the second of at (Unix ns),
// granting it if needed, to end etcdLeaseGrace seconds after that
// second.
func (l *leaseCache) of(ctx context.Context, at, now int64) (int64, error) {
	sec := at/int64(time.Second) + 1 // the end of at's second
	l.mu.Lock()
	defer l.mu.Unlock()
	if id, ok := l.m[sec]; ok {
		return id, nil
	}
	id, _, err := l.c.leaseGrant(ctx, sec-now/int64(time.Second)+etcdLeaseGrace)
	if err != nil {
		return 0, err
	}
	if l.m == nil {
		l.m = make(map[int64]int64)
	}
	for s := range l.m {
		if s < now/int64(time.Second) {
			delete(l.m, s) // its second is over: no key will take it
		}
	}
	l.m[sec] = id
	return id, nil
}

// forget drops every lease: etcd no longer has one of them.
func (l *leaseCache) forget() {
	l.mu.Lock()
	l.m = nil
	l.mu.Unlock()
}
