// A node's writes (-etcd): a transaction (or a single write) as one etcd
// request, what etcd answered it, and expiry: the node's half of the
// cluster's journal (cluster.go has its design; clusterread.go how a node
// knows its view is current).

package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
)

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
	if len(req.Compare) == 0 && len(req.Success) == 1 {
		switch op := req.Success[0]; {
		case op.Put != nil:
			r, err := etcdCall[struct {
				etcdAnswer
				PrevKV *etcdKV `json:"prev_kv"`
			}](ctx, j.c, tripPut, "/v3/kv/put", false, op.Put)
			if err != nil {
				return nil, err
			}
			return &etcdWritten{revision: r.Header.Revision, succeeded: true, prev: []*etcdKV{r.PrevKV}}, nil
		case op.Delete != nil:
			r, err := etcdCall[struct {
				etcdAnswer
				PrevKVs []etcdKV `json:"prev_kvs"`
			}](ctx, j.c, tripDelete, "/v3/kv/deleterange", false, op.Delete)
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
