// Durability (-data DIR, SPEC section 8): every change of the store,
// appended to a log before anyone is told of it, and now and then a
// snapshot of the whole store, after which the older log is dropped.
//
// The directory holds
//
//	LOCK        locked (flock) while a server uses the directory
//	snap-<seq>  every key as of change <seq>
//	log-<seq>   the changes from <seq> on, in order
//
// with <seq> in 16 hex digits, so that names sort in sequence order. The
// newest snapshot and the logs after it are the store: recovery loads
// the one and replays the others (recovery.go). record.go holds the
// format of their records; datafs.go the few file operations used,
// through a seam that tests replace to enumerate the states a crash can
// leave.
//
// What a crash may leave, and what each becomes on the next start:
//
//   - the newest log cut inside a record, or zeroes after its last
//     record (kill -9 or power loss mid-write): the tail is dropped with
//     a warning and the log truncated there;
//   - the newest log empty, zeroes or cut inside its header (a crash
//     between creating it and its header reaching the disk): its header
//     is written again;
//   - a snap-*.tmp (a snapshot never finished): removed;
//   - files a compaction was about to remove: removed.
//
// A log is made durable before the log after it is created, so the one
// loss a power failure may add, a tail not yet fsynced, is always at the
// end of the newest log. Anything else (a bad checksum before the end, a
// gap between logs, a log without the snapshot it needs, a snapshot cut
// short: snapshots are renamed into place whole) is damage no crash
// causes, and stops the server with the file and the offset.

package main

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"io"
	"iter"
	"log/slog"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// fsyncMode says when the log reaches the disk itself (-fsync).
type fsyncMode int

const (
	fsyncSecond fsyncMode = iota // every second: at most about a second lost to a power failure
	fsyncAlways                  // before a write is acknowledged
	fsyncNever                   // when the OS decides
)

func (m *fsyncMode) String() string {
	switch *m {
	case fsyncAlways:
		return "always"
	case fsyncNever:
		return "never"
	}
	return "1s"
}

func (m *fsyncMode) Set(s string) error {
	switch s {
	case "always":
		*m = fsyncAlways
	case "1s":
		*m = fsyncSecond
	case "never":
		*m = fsyncNever
	default:
		return fmt.Errorf("want always, 1s or never")
	}
	return nil
}

// errLocked is lockFile's answer when another process has the lock.
var errLocked = errors.New("locked")

// errNotWritten is what a write gets if its change could not be written
// to the data files: the server then stops (see dataDir.fail).
var errNotWritten = errors.New("the change could not be written to the data files")

// dataFS is the file system the data files are kept in; a test's child
// process may replace it, before anything runs, to inject errors.
var dataFS fileSystem = osFS{}

// logFile is an open log and its path, for errors.
type logFile struct {
	f    dataFile
	path string
}

// dataDir keeps a store in a directory; it is the store's journal. One
// goroutine, the flusher, writes the log: it takes the changes committed
// since its last write, writes them with one write(2), and with -fsync
// always one fsync, which concurrent writes thus share (group commit);
// then it settles them: they become visible, are published, and their
// writers are answered. No lock is held while it writes, so writes to a
// key go on meanwhile and join the next batch.
type dataDir struct {
	fs    fileSystem
	dir   string
	fsync fsyncMode
	log   *slog.Logger
	s     *Store
	lockf io.Closer

	mu       sync.Mutex // guards the three below; taken inside the store's seqMu
	queued   *batch     // the changes for the next write
	closed   bool       // no more changes are taken
	broken   error      // a write or fsync failed: every change after fails too
	failOnce sync.Once

	inflight inflightTable

	startOnce sync.Once
	closeOnce sync.Once
	closeErr  error

	wake    chan struct{} // the flusher has changes to write (capacity 1)
	stop    chan struct{} // closed to stop the flusher, once it has written all
	done    chan struct{} // closed when the flusher has stopped
	failed  chan struct{} // closed when a write or fsync failed: the server must stop
	syncers sync.WaitGroup

	// owned by the flusher
	seg        logFile // the log written to
	logBytes   int64   // of the logs after the newest snapshot
	buf        []byte
	compacting atomic.Bool
	compaction sync.WaitGroup
	minCompact int64 // compact only once the logs hold at least this much

	// Tests only: how often the syncer runs (-fsync 1s); the rotation
	// order reversed, the new log created before the old one is made
	// durable, as it was before, to show that the crash-state test finds
	// what that order loses; and a rotation due while a compaction runs
	// waiting for it (awaitCompaction) rather than being put off to the
	// first batch after it, so that how many rotations a workload makes
	// depends on what it writes, not on how long the scheduler lets each
	// compaction run.
	syncEvery       time.Duration
	newLogFirst     bool
	awaitCompaction bool

	// The log the syncer makes durable every second, if dirty. syncMu is
	// held while it does, so that the flusher neither closes the file
	// under it when it rotates nor acknowledges a change while an fsync
	// that may fail is under way.
	syncMu sync.Mutex
	synced logFile
	dirty  bool

	// figures for /metrics
	fsyncs, fsyncNanos atomic.Int64
	snapshots          atomic.Int64 // written since the server started
	snapBytes          atomic.Int64
	logSize            atomic.Int64
}

// openData opens (creating it if needed) the data directory dir, locks
// it, and loads what it holds into s, an empty store; from then on s
// writes every change there.
func openData(dir string, mode fsyncMode, s *Store, log *slog.Logger) (*dataDir, error) {
	d, err := loadData(dir, mode, s, log)
	if err != nil {
		return nil, err
	}
	d.start()
	return d, nil
}

// loadData is openData without starting the flusher: changes committed
// then wait in d.queued.
func loadData(dir string, mode fsyncMode, s *Store, log *slog.Logger) (*dataDir, error) {
	return loadDataFS(dataFS, dir, mode, s, log)
}

// loadDataFS is loadData on the file system fs.
func loadDataFS(fs fileSystem, dir string, mode fsyncMode, s *Store, log *slog.Logger) (*dataDir, error) {
	if err := fs.mkdirAll(dir); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	d := &dataDir{
		fs: fs, dir: dir, fsync: mode, log: log, s: s,
		queued:     newBatch(),
		wake:       make(chan struct{}, 1),
		stop:       make(chan struct{}),
		done:       make(chan struct{}),
		failed:     make(chan struct{}),
		minCompact: 1 << 20,
		syncEvery:  time.Second,
	}
	d.inflight.seed = maphash.MakeSeed()
	s.expiry.hold() // until the store is loaded: an expiry would take a number mid-replay
	defer s.expiry.resume()
	if err := d.lock(); err != nil {
		return nil, err
	}
	if err := d.recover(); err != nil {
		d.lockf.Close()
		return nil, err
	}
	d.synced = d.seg
	s.journal = d // before any request: the listener starts after
	return d, nil
}

// start starts the flusher, and the syncer for -fsync 1s, once.
func (d *dataDir) start() {
	d.startOnce.Do(func() {
		go d.flush()
		if d.fsync == fsyncSecond {
			d.syncers.Add(1)
			go d.syncEverySecond()
		}
	})
}

// lock takes the directory's LOCK file, or says who has it.
func (d *dataDir) lock() error {
	l, err := d.fs.lock(d.dir)
	var locked *lockedError
	switch {
	case errors.As(err, &locked):
		return fmt.Errorf("data directory %s is in use by another atomkv (pid %s); one server per directory", d.dir, locked.pid)
	case err != nil:
		return fmt.Errorf("data directory: %w", err)
	}
	d.lockf = l
	return nil
}

// commit decides t, numbers it and queues it for the flusher, and
// returns once it is written and applied.
func (d *dataDir) commit(t *txn) error { return d.s.decide(t, d) }

// expire makes the expiry of d's key a change, if dl is still its
// deadline.
func (d *dataDir) expire(dl *deadline) { d.s.expireLocal(dl, d) }

// current returns at once: the store holds every change made.
func (d *dataDir) current(context.Context) error { return nil }

// keep numbers changes and queues them for the next write of the log, as
// one record, and holds each key's new version until it is written: the
// store's writers work on it meanwhile. The changes' slots are locked.
func (d *dataDir) keep(changes []change) int64 {
	s := d.s
	s.seqMu.Lock()
	defer s.seqMu.Unlock()
	s.seq++
	for i := range changes {
		changes[i].seq = s.seq
	}
	b := d.queue(changes)
	for _, c := range changes {
		d.hold(c.sl, c.e, c.seq, b)
	}
	return s.seq
}

// queue takes changes for the next write of the log and returns their
// batch. The store's seqMu is held, so changes join in sequence order.
func (d *dataDir) queue(changes []change) *batch {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed || d.broken != nil {
		b := newBatch() // nobody will write it
		b.err = errNotWritten
		close(b.done)
		return b
	}
	first := len(d.queued.changes) == 0
	d.queued.changes = append(d.queued.changes, changes...)
	if first {
		select {
		case d.wake <- struct{}{}:
		default:
		}
	}
	return d.queued
}

// flush is the flusher: it writes batches until stopped, then writes
// what is left.
func (d *dataDir) flush() {
	defer close(d.done)
	for {
		select {
		case <-d.wake:
		case <-d.stop:
			d.write(d.take())
			return
		}
		runtime.Gosched() // the writers of the moment join the batch
		if !d.write(d.take()) {
			return
		}
	}
}

// take returns the changes committed since the last take.
func (d *dataDir) take() *batch {
	d.mu.Lock()
	defer d.mu.Unlock()
	b := d.queued
	d.queued = newBatch()
	return b
}

// write writes a batch to the log and settles it, and reports whether
// the flusher can go on.
func (d *dataDir) write(b *batch) bool {
	if len(b.changes) == 0 {
		close(b.done)
		return true
	}
	d.buf = d.buf[:0]
	for cs := range records(b.changes) {
		d.buf = appendChanges(d.buf, cs)
	}
	if _, err := d.seg.f.Write(d.buf); err != nil {
		d.fail(fmt.Errorf("writing %s: %w", d.seg.path, err), b)
		return false
	}
	if d.fsync == fsyncAlways {
		if err := d.sync(d.seg); err != nil {
			d.fail(err, b)
			return false
		}
	}
	d.logBytes += int64(len(d.buf))
	d.logSize.Add(int64(len(d.buf)))
	// An fsync of the log under way elsewhere (the syncer's with -fsync
	// 1s, a snapshot's in every mode: writeSnapshot) ends first: if it
	// fails, what the log holds is not known, and nothing more may be
	// acknowledged. (With 1s the flusher waits so at most one fsync a
	// second.)
	d.syncMu.Lock()
	if d.fsync == fsyncSecond {
		d.dirty = true
	}
	err := d.failure()
	if err == nil {
		d.settle(b)
	}
	d.syncMu.Unlock()
	if err != nil {
		d.fail(err, b)
		return false
	}
	close(b.done)
	if d.logBytes <= 4*max(d.s.liveSize(), d.minCompact) {
		return true
	}
	if d.awaitCompaction {
		d.compaction.Wait() // the flusher is the one goroutine that adds to it
	}
	if d.compacting.CompareAndSwap(false, true) {
		if err := d.rotate(b.changes[len(b.changes)-1].seq); err != nil {
			d.compacting.Store(false)
			d.fail(err, nil)
			return false
		}
	}
	return true
}

// failure is the error that broke the data files, or nil.
func (d *dataDir) failure() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.broken
}

// breakWith marks the data files broken by err, if nothing broke them
// before: no change is taken nor acknowledged from now on.
func (d *dataDir) breakWith(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.broken == nil {
		d.broken = err
	}
}

// settle settles a written batch: each record in sequence order, but a
// key's single change that the very next record, a single change of the
// same key, supersedes: a subscriber may skip intermediate revisions
// anyway, and its number is behind the one published. So a hot key
// written by one writer after another costs the flusher one lock of its
// slot per run, not one per write. Skipping a change further back would
// show a later one of another key without it (a change applied before
// one numbered earlier: what X-Seq promises, and a transaction that
// checked it, would not hold).
func (d *dataDir) settle(b *batch) {
	var held []change // revealed unless the very next record supersedes it
	for cs := range records(b.changes) {
		if held != nil && !(len(cs) == 1 && len(held) == 1 && cs[0].sl == held[0].sl) {
			d.reveal(held)
		}
		held = cs
	}
	if held != nil {
		d.reveal(held)
	}
}

// reveal makes written changes (one key's, or a transaction's) visible:
// each version becomes its slot's cur, which readers see, and they are
// applied; and so are the earlier changes of their keys written with
// them, which they supersede. The keys are locked meanwhile, so that a
// subscription reading a key's state sees it either before (and gets
// the change after) or after.
func (d *dataDir) reveal(changes []change) {
	slots := make([]*slot, len(changes))
	for i, c := range changes {
		slots[i] = c.sl
	}
	slices.SortFunc(slots, func(a, b *slot) int { return strings.Compare(a.key, b.key) })
	for _, sl := range slots {
		sl.mu.Lock()
	}
	d.s.seqMu.Lock()
	d.s.apply(changes)
	d.s.seqMu.Unlock()
	for _, c := range changes {
		d.written(c)
	}
	for _, sl := range slots {
		d.s.release(d, sl)
		sl.mu.Unlock()
	}
}

// records yields the changes of a batch record by record: a
// transaction's changes, which share a number, or one change.
func records(changes []change) iter.Seq[[]change] {
	return func(yield func([]change) bool) {
		for len(changes) > 0 {
			n := 1
			for n < len(changes) && changes[n].seq == changes[0].seq {
				n++
			}
			if !yield(changes[:n]) {
				return
			}
			changes = changes[n:]
		}
	}
}

// fail stops the store writing: a change it could not write, or whose
// file could not be made durable, has been applied in memory, where
// readers do not see it, but on disk it may not be, and the two would
// drift apart. b's writers, and every later one, get errNotWritten; the
// server stops (run watches failed), and on the next start recovery
// finds the files as they were. Fail-stop, as etcd does on a WAL write
// error, and as PostgreSQL learned to do on a failed fsync: the kernel
// may have dropped the dirty pages, and a retry would report success for
// lost data. Any goroutine may call it, more than once.
func (d *dataDir) fail(err error, b *batch) {
	d.breakWith(err)
	d.mu.Lock()
	rest := d.queued
	d.queued = newBatch()
	cause := d.broken // the first failure, if another came first
	d.mu.Unlock()
	d.failOnce.Do(func() { // before anyone hears of the failure
		d.log.Error("data files: the server stops", "err", cause)
		close(d.failed)
	})
	for _, b := range []*batch{b, rest} {
		if b != nil {
			b.err = errNotWritten
			close(b.done)
		}
	}
}

// sync makes a log durable, and counts how long that took.
func (d *dataDir) sync(l logFile) error {
	start := time.Now()
	err := l.f.Sync()
	d.fsyncs.Add(1)
	d.fsyncNanos.Add(int64(time.Since(start)))
	if err != nil {
		return fmt.Errorf("fsync of %s: %w", l.path, err)
	}
	return nil
}

// syncEverySecond makes the log durable every second it was written to.
func (d *dataDir) syncEverySecond() {
	defer d.syncers.Done()
	tick := time.NewTicker(d.syncEvery)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
		case <-d.done:
			return
		}
		if err := d.syncDirty(); err != nil {
			d.fail(err, nil)
			return
		}
	}
}

// syncDirty makes the log durable if it was written to since the last
// time.
func (d *dataDir) syncDirty() error {
	d.syncMu.Lock()
	defer d.syncMu.Unlock()
	if !d.dirty {
		return nil
	}
	d.dirty = false
	err := d.sync(d.synced)
	if err != nil {
		d.breakWith(err) // before the flusher, waiting for syncMu, acknowledges more
	}
	return err
}

// rotate starts a new log after the change numbered upTo, all of which
// (and all before) the old log holds, and compacts in the background: a
// snapshot as of upTo, after which the old logs can go.
//
// The old log is made durable before the new one is created: were it
// the other way round, a power failure could keep the new log and lose
// the old one's tail, which -fsync 1s and never allow, and the changes
// between would be missing, which no start-up can mend.
func (d *dataDir) rotate(upTo int64) error {
	d.syncMu.Lock()
	defer d.syncMu.Unlock()
	old := d.seg
	if !d.newLogFirst {
		if err := d.sync(old); err != nil {
			return err
		}
	}
	seg, err := d.createLog(upTo + 1)
	if err != nil {
		return err
	}
	if d.newLogFirst {
		if err := d.sync(old); err != nil {
			return err
		}
	}
	old.f.Close()
	d.seg, d.synced = seg, seg
	d.dirty = false
	d.logBytes = 0
	d.compaction.Add(1)
	go d.compact(upTo)
	return nil
}

// compact writes a snapshot as of upTo and removes what it replaces.
//
// The snapshot is taken while writes go on, so a key may be in it at a
// version newer than upTo, or missing if deleted since. Either way the
// log after upTo holds those changes, and replaying a record sets a key
// to what it says whatever it was: the snapshot plus that log is the
// store, as a snapshot taken at upTo would be. A version in the snapshot
// is one already written to the log, but perhaps not yet durable there:
// the log is made durable before the snapshot is renamed into place
// (writeSnapshot), or a power failure could keep the snapshot and lose
// the record, and replay an older change of the key over it (a key of a
// transaction gone back, its other keys not: TestCrashStatesSnapshotAheadOfLog).
func (d *dataDir) compact(upTo int64) {
	defer d.compaction.Done()
	defer d.compacting.Store(false)
	if err := d.writeSnapshot(upTo); err != nil {
		d.fail(err, nil)
		return
	}
	d.removeBefore(upTo)
	d.snapshots.Add(1)
}

// removeBefore removes the snapshots older than the one as of upTo and
// the logs whose changes it holds.
func (d *dataDir) removeBefore(upTo int64) {
	snaps, logs, _ := d.files()
	for _, seq := range snaps {
		if seq < upTo {
			d.fs.remove(d.path("snap", seq))
		}
	}
	for _, seq := range logs {
		if seq <= upTo {
			d.fs.remove(d.path("log", seq))
		}
	}
	var size int64
	for _, seq := range logs {
		if seq > upTo {
			if n, err := d.fs.size(d.path("log", seq)); err == nil {
				size += n
			}
		}
	}
	d.logSize.Store(size)
}

// close writes what is pending, makes it durable and releases the
// directory; a second call does nothing. Changes committed after get
// errNotWritten. It returns what broke the data files, if anything did.
func (d *dataDir) close() error {
	d.closeOnce.Do(func() {
		d.mu.Lock()
		d.closed = true
		d.mu.Unlock()
		d.start() // if it never was: the flusher writes what is pending, then stops
		close(d.stop)
		<-d.done
		d.syncers.Wait()
		d.compaction.Wait()
		if d.closeErr = d.failure(); d.closeErr == nil {
			if d.closeErr = d.sync(d.seg); d.closeErr != nil {
				d.fail(d.closeErr, nil)
			}
		}
		d.seg.f.Close()
		d.lockf.Close() // which unlocks it
	})
	return d.closeErr
}

// path is the file of a snapshot ("snap") or log ("log") named by seq.
func (d *dataDir) path(kind string, seq int64) string {
	return filepath.Join(d.dir, fmt.Sprintf("%s-%016x", kind, seq))
}

// createLog creates the log whose first change is first, durably.
func (d *dataDir) createLog(first int64) (logFile, error) {
	path := d.path("log", first)
	f, err := d.fs.create(path)
	if err != nil {
		return logFile{}, fmt.Errorf("data directory: %w", err)
	}
	head := appendRecord(nil, appendHeader(nil, 'L', first))
	if _, err = f.Write(head); err == nil {
		if err = f.Sync(); err == nil {
			err = d.fs.syncDir(d.dir)
		}
	}
	if err != nil {
		f.Close()
		return logFile{}, fmt.Errorf("creating %s: %w", path, err)
	}
	d.logSize.Add(int64(len(head)))
	return logFile{f, path}, nil
}

// writeSnapshot writes every key of the store to the snapshot as of
// change upTo: to a temporary file, made durable, then renamed into
// place, and the directory made durable.
func (d *dataDir) writeSnapshot(upTo int64) error {
	path := d.path("snap", upTo)
	tmp := path + ".tmp"
	f, err := d.fs.create(tmp)
	if err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	w := bufio.NewWriterSize(f, 256<<10)
	var written int64
	var rec []byte // not d.buf: this runs beside the flusher
	put := func(body []byte) {
		rec = appendRecord(rec[:0], body)
		n, _ := w.Write(rec) // a bufio.Writer keeps its first error for Flush
		written += int64(n)
	}
	put(appendHeader(nil, 'S', upTo))
	block := []byte{'B'}
	var count uint64
	d.s.walk(func(key string, e *entry) {
		block = appendSnapshotKey(block, key, e)
		count++
		if len(block) >= 64<<10 {
			put(block)
			block = block[:1]
		}
	})
	if len(block) > 1 {
		put(block)
	}
	put(binary.AppendUvarint([]byte{'E'}, count))
	err = w.Flush()
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		// The walk read versions whose records may not be durable yet
		// (-fsync 1s, never): a power failure that kept the snapshot and
		// lost them from the log would replay older changes of those keys
		// over it, and show a transaction in part. So the log is made
		// durable up to here before the snapshot can count.
		d.syncMu.Lock()
		if d.synced.f != nil {
			if err = d.sync(d.synced); err != nil {
				d.breakWith(err) // before the flusher, waiting for syncMu, acknowledges more
			}
		}
		d.syncMu.Unlock()
	}
	if err == nil {
		err = d.fs.rename(tmp, path)
	}
	if err == nil {
		err = d.fs.syncDir(d.dir)
	}
	if err != nil {
		d.fs.remove(tmp)
		return fmt.Errorf("writing snapshot %s: %w", path, err)
	}
	d.snapBytes.Store(written)
	return nil
}

// inflightTable holds, with -data, each key's newest version while its
// change is not yet in the data files: writers of the key (which hold
// its slot's lock) work on it, readers see the slot's cur, the version
// on disk. It is sharded, so that writers of different keys do not
// contend on one lock, and keyed by slot, so that it allocates nothing
// per write.
type inflightTable struct {
	seed   maphash.Seed
	shards [inflightShards]inflightShard
}

const inflightShards = 64

type inflightShard struct {
	mu sync.Mutex
	m  map[*slot]inflight
}

// inflight is a slot's newest version while its change is being written.
type inflight struct {
	e     *entry // nil: deleted
	last  int64  // the number of its change
	batch *batch // its batch, to wait for
}

func (t *inflightTable) shard(sl *slot) *inflightShard {
	return &t.shards[maphash.String(t.seed, sl.key)%inflightShards]
}

// hold records e, of the change numbered seq in batch b, as the slot's
// newest version. The slot is locked.
func (d *dataDir) hold(sl *slot, e *entry, seq int64, b *batch) {
	sh := d.inflight.shard(sl)
	sh.mu.Lock()
	if sh.m == nil {
		sh.m = make(map[*slot]inflight)
	}
	sh.m[sl] = inflight{e: e, last: seq, batch: b}
	sh.mu.Unlock()
}

// pending returns the slot's newest version and its batch, if its change
// is not yet written. The slot is locked.
func (d *dataDir) pending(sl *slot) (*entry, *batch, bool) {
	sh := d.inflight.shard(sl)
	sh.mu.Lock()
	f, ok := sh.m[sl]
	sh.mu.Unlock()
	return f.e, f.batch, ok
}

// written forgets key's in-flight version once c, its newest change, is
// written. The slot is locked.
func (d *dataDir) written(c change) {
	sh := d.inflight.shard(c.sl)
	sh.mu.Lock()
	if f, ok := sh.m[c.sl]; ok && f.last == c.seq {
		delete(sh.m, c.sl)
	}
	sh.mu.Unlock()
}
