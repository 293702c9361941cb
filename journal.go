// The journal: the one way a change reaches the store. A journal decides
// a transaction (do its checks hold?), numbers it, keeps it where its
// mode keeps changes, and has the store apply it (Store.apply), the same
// code in every mode. There are three:
//
//   - memJournal: in memory; the store decides, numbers and applies at
//     once;
//   - dataDir (data.go, -data): the store decides and numbers; the change
//     is applied once its record is in the log;
//   - etcdJournal (etcd.go, -etcd): etcd decides and numbers (its
//     revision); the change is applied when the node's watch brings it
//     back, as on every other node.

package main

import "context"

// journal is where every change of the store goes.
type journal interface {
	// commit applies t if its checks hold, as one change, and returns
	// once the change is applied on this server (so a read here sees
	// it); on a failed check it returns a *conflictError.
	commit(t *txn) error
	// expire ends d's key, if d is still the deadline of its version: a
	// write that raced the timer replaced the version, and wins.
	expire(d *deadline)
	// current returns once this server's view holds every change
	// committed anywhere before it was called: at once for a single
	// server, after a round trip to etcd for a node.
	current(ctx context.Context) error
}

// localJournal is a journal that keeps changes on this server (memory,
// -data): the store decides a transaction under its keys' locks
// (Store.decide), and the journal numbers and keeps it.
type localJournal interface {
	// keep numbers changes (one key's, or a transaction's: one number)
	// and keeps them, under seqMu, with their slots locked; it returns
	// their number. The store applies them when the journal says: at
	// once in memory, once written with -data.
	keep(changes []change) (seq int64)
	// pending returns the newest version of a locked slot and the batch
	// it waits for, if a change of it is kept but not yet applied.
	pending(sl *slot) (*entry, *batch, bool)
}

// memJournal keeps nothing: a change is applied as soon as it is
// numbered.
type memJournal struct{ s *Store }

func (j memJournal) commit(t *txn) error { return j.s.decide(t, j) }
func (j memJournal) expire(d *deadline)  { j.s.expireLocal(d, j) }

func (j memJournal) pending(*slot) (*entry, *batch, bool) { return nil, nil, false }
func (j memJournal) current(context.Context) error        { return nil }

func (j memJournal) keep(changes []change) int64 {
	s := j.s
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	s.seq++
	for i := range changes {
		changes[i].seq = s.seq
	}
	s.apply(changes)
	return s.seq
}

// batch is the changes one write of the log holds (-data). Their writers
// wait for done; err, set before done is closed, says if it failed.
type batch struct {
	changes []change
	done    chan struct{}
	err     error
}

func newBatch() *batch { return &batch{done: make(chan struct{})} }

// wait returns once the batch is written, or could not be.
func (b *batch) wait() error {
	<-b.done
	return b.err
}
