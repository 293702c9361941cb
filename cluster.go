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

	reconnects atomic.Int64 // watches opened after the first, for /metrics
	resyncs    atomic.Int64 // reads of the prefix after a compaction, for /metrics
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
	opened := false
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
		if opened {
			j.reconnects.Add(1)
		}
		opened = true
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
				if !errors.Is(err, errWatchClosed) {
					j.c.stats.noteError(w.endpoint, err)
				}
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
		j.resyncs.Add(1)
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

// close stops the watch and the watchdog.
func (j *etcdJournal) close() error {
	j.stop()
	j.workers.Wait()
	j.c.close()
	return nil
}
