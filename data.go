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
// the one and replays the others.
//
// Every record, in both kinds of file, is framed as etcd's WAL frames
// them, and its header has a check of its own:
//
//	uint32 n     length of the body (little-endian)
//	uint32 crc   CRC-32C of the body
//	uint32 hcrc  CRC-32C of n and crc
//	[n]byte      the body
//
// so that a record cut short at the end of the log (a crash mid-write)
// is told apart from damage (a check that fails before the end, or a
// length that was flipped), which stops the server with the file and
// the offset rather than lose data silently. Bodies hold varints:
//
//	'H' "atomkv" version kind first   a file's first record; kind 'L' (first: its first change)
//	                                  or 'S' (first: the last change it holds)
//	'S' seq revision deadline len key value   a write; deadline in Unix ns, 0 for none
//	'D' seq key                       a delete
//	'X' seq key                       an expiry
//	'B' (len key len value revision deadline)...   a block of a snapshot's keys
//	'E' count                         the end of a snapshot, which holds count keys

package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
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

// batch is the changes one write of the log holds. Their writers wait
// for done; err, set before done is closed, says if it failed.
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

// dataDir keeps a store in a directory. One goroutine, the flusher,
// writes the log: it takes the changes committed since its last write,
// writes them with one write(2), and with -fsync always one fsync, which
// concurrent writes thus share (group commit); then it settles them: they
// become visible, are published, and their writers are answered. No lock
// is held while it writes, so writes to a key go on meanwhile and join
// the next batch.
type dataDir struct {
	dir   string
	fsync fsyncMode
	log   *slog.Logger
	s     *Store
	lockf *os.File

	// guarded by s.seqMu
	pending *batch
	closed  bool  // no more changes are taken
	broken  error // a write failed: every change after fails too

	startOnce sync.Once
	closeOnce sync.Once
	closeErr  error

	wake   chan struct{} // the flusher has changes to write (capacity 1)
	stop   chan struct{} // closed to stop the flusher, once it has written all
	done   chan struct{} // closed when the flusher has stopped
	failed chan struct{} // closed when a write failed: the server must stop

	// owned by the flusher
	seg        *os.File // the log written to
	logBytes   int64    // of the logs after the newest snapshot
	buf        []byte
	lastOf     map[*slot]int // of a batch: the index of each slot's last change
	compacting atomic.Bool
	compaction sync.WaitGroup
	minCompact int64 // compact only once the logs hold at least this much

	// the log file the syncer makes durable every second
	syncMu sync.Mutex
	synced *os.File
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
// then wait in d.pending.
func loadData(dir string, mode fsyncMode, s *Store, log *slog.Logger) (*dataDir, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	d := &dataDir{
		dir: dir, fsync: mode, log: log, s: s,
		pending:    newBatch(),
		wake:       make(chan struct{}, 1),
		stop:       make(chan struct{}),
		done:       make(chan struct{}),
		failed:     make(chan struct{}),
		minCompact: 1 << 20,
		lastOf:     make(map[*slot]int),
	}
	if err := d.lock(); err != nil {
		return nil, err
	}
	if err := d.recover(); err != nil {
		d.lockf.Close()
		return nil, err
	}
	d.synced = d.seg
	s.data = d
	// Deadlines are scheduled only now: an expiry during recovery would
	// have taken a change number in the middle of the replay.
	s.keys.Range(func(_, v any) bool {
		if e := v.(*slot).load(); e != nil && e.ttl != nil {
			s.expiry.add(e.ttl)
		}
		return true
	})
	return d, nil
}

// start starts the flusher, and the syncer for -fsync 1s, once.
func (d *dataDir) start() {
	d.startOnce.Do(func() {
		go d.flush()
		if d.fsync == fsyncSecond {
			go d.syncEverySecond()
		}
	})
}

// lock takes the directory's LOCK file, or says who has it.
func (d *dataDir) lock() error {
	path := filepath.Join(d.dir, "LOCK")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	if err := lockFile(f); err != nil {
		pid, _ := io.ReadAll(f)
		f.Close()
		if errors.Is(err, errLocked) {
			return fmt.Errorf("data directory %s is in use by another atomkv (pid %s); one server per directory", d.dir, bytes.TrimSpace(pid))
		}
		return fmt.Errorf("locking %s: %w", path, err)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	d.lockf = f
	return nil
}

// queue takes a change for the next write of the log and returns its
// batch. s.seqMu must be held.
func (d *dataDir) queue(c change) *batch {
	if d.closed || d.broken != nil {
		b := newBatch() // nobody will write it
		b.err = errNotWritten
		close(b.done)
		return b
	}
	d.pending.changes = append(d.pending.changes, c)
	if len(d.pending.changes) == 1 {
		select {
		case d.wake <- struct{}{}:
		default:
		}
	}
	return d.pending
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
	d.s.seqMu.Lock()
	defer d.s.seqMu.Unlock()
	b := d.pending
	d.pending = newBatch()
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
	for _, c := range b.changes {
		d.buf = appendChange(d.buf, c)
	}
	_, err := d.seg.Write(d.buf)
	if err == nil && d.fsync == fsyncAlways {
		err = d.sync(d.seg)
	}
	if err != nil {
		d.fail(fmt.Errorf("writing %s: %w", d.seg.Name(), err), b)
		return false
	}
	d.logBytes += int64(len(d.buf))
	d.logSize.Add(int64(len(d.buf)))
	if d.fsync == fsyncSecond {
		d.syncMu.Lock()
		d.dirty = true
		d.syncMu.Unlock()
	}
	d.settle(b)
	close(b.done)
	if d.logBytes > 4*max(d.s.liveBytes.Load(), d.minCompact) && d.compacting.CompareAndSwap(false, true) {
		if err := d.rotate(b.changes[len(b.changes)-1].seq); err != nil {
			d.fail(err, nil)
			return false
		}
	}
	return true
}

// settle settles a written batch: of each key, its last change in the
// batch, in sequence order. The earlier changes of a key are superseded:
// a subscriber may skip intermediate revisions anyway, and their numbers
// are behind the one published. So a hot key costs the flusher one lock
// of its slot per batch, not one per write.
func (d *dataDir) settle(b *batch) {
	clear(d.lastOf)
	for i, c := range b.changes {
		d.lastOf[c.sl] = i
	}
	for i, c := range b.changes {
		if d.lastOf[c.sl] == i {
			d.s.settle(c)
		}
	}
}

// fail stops the store writing: a change it could not write has been
// applied in memory, where readers do not see it, but on disk it is not,
// and the two would drift apart. b's writers, and every later one, get
// errNotWritten; the server stops (run watches failed), and on the next
// start recovery finds the files as they were. Fail-stop, as etcd does on
// a WAL write error.
func (d *dataDir) fail(err error, b *batch) {
	d.log.Error("data files: the server stops", "err", err)
	d.s.seqMu.Lock()
	d.broken = err
	rest := d.pending
	d.pending = newBatch()
	d.s.seqMu.Unlock()
	for _, b := range []*batch{b, rest} {
		if b != nil {
			b.err = errNotWritten
			close(b.done)
		}
	}
	close(d.failed)
}

// sync makes f durable, and counts how long that took.
func (d *dataDir) sync(f *os.File) error {
	start := time.Now()
	err := f.Sync()
	d.fsyncs.Add(1)
	d.fsyncNanos.Add(int64(time.Since(start)))
	return err
}

// syncEverySecond makes the log durable every second it was written to.
func (d *dataDir) syncEverySecond() {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
		case <-d.done:
			return
		}
		d.syncMu.Lock()
		f, dirty := d.synced, d.dirty
		d.dirty = false
		d.syncMu.Unlock()
		if dirty {
			// A file rotated out meanwhile is closed: the compaction
			// made it durable first.
			if err := d.sync(f); err != nil && !errors.Is(err, os.ErrClosed) {
				d.log.Error("data files: fsync", "err", err)
			}
		}
	}
}

// rotate starts a new log after the change numbered upTo, all of which
// (and all before) the old log holds, and compacts in the background: a
// snapshot as of upTo, after which the old logs can go.
func (d *dataDir) rotate(upTo int64) error {
	old := d.seg
	seg, err := d.createLog(upTo + 1)
	if err != nil {
		return err
	}
	d.seg = seg
	d.syncMu.Lock()
	d.synced, d.dirty = seg, false
	d.syncMu.Unlock()
	d.logBytes = 0
	d.compaction.Add(1)
	go d.compact(old, upTo)
	return nil
}

// compact makes the rotated-out log durable, writes a snapshot as of
// upTo and removes what it replaces.
//
// The snapshot is taken while writes go on, so a key may be in it at a
// version newer than upTo, or missing if deleted since. Either way the
// log after upTo holds those changes, and replaying a record sets a key
// to what it says whatever it was: the snapshot plus that log is the
// store, as a snapshot taken at upTo would be. (A version newer than
// upTo is installed before it is written to the log; if a crash then
// loses its record, the snapshot keeps a write that was never
// acknowledged, which is allowed: no acknowledged write is lost.)
func (d *dataDir) compact(old *os.File, upTo int64) {
	defer d.compaction.Done()
	defer d.compacting.Store(false)
	err := d.sync(old)
	old.Close()
	if err == nil {
		err = d.writeSnapshot(upTo)
	}
	if err != nil {
		// Not fatal: the logs still hold everything.
		d.log.Error("data files: compaction failed", "err", err)
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
			os.Remove(d.path("snap", seq))
		}
	}
	for _, seq := range logs {
		if seq <= upTo {
			os.Remove(d.path("log", seq))
		}
	}
	var size int64
	for _, seq := range logs {
		if seq > upTo {
			if fi, err := os.Stat(d.path("log", seq)); err == nil {
				size += fi.Size()
			}
		}
	}
	d.logSize.Store(size)
}

// close writes what is pending, makes it durable and releases the
// directory; a second call does nothing. Changes committed after get
// errNotWritten.
func (d *dataDir) close() error {
	d.closeOnce.Do(func() {
		d.s.seqMu.Lock()
		d.closed = true
		d.s.seqMu.Unlock()
		d.start() // if it never was: the flusher writes what is pending, then stops
		close(d.stop)
		<-d.done
		d.compaction.Wait()
		d.closeErr = d.sync(d.seg)
		if err := d.seg.Close(); d.closeErr == nil {
			d.closeErr = err
		}
		d.lockf.Close() // which unlocks it
	})
	return d.closeErr
}

// path is the file of a snapshot ("snap") or log ("log") named by seq.
func (d *dataDir) path(kind string, seq int64) string {
	return filepath.Join(d.dir, fmt.Sprintf("%s-%016x", kind, seq))
}

// files lists the snapshots and logs in the directory, in order, and
// removes temporary files a crash left behind.
func (d *dataDir) files() (snaps, logs []int64, err error) {
	entries, err := os.ReadDir(d.dir)
	if err != nil {
		return nil, nil, fmt.Errorf("data directory: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		kind, hex, _ := strings.Cut(name, "-")
		seq, perr := strconv.ParseInt(hex, 16, 64)
		switch {
		case strings.HasSuffix(name, ".tmp"):
			os.Remove(filepath.Join(d.dir, name)) // a snapshot never finished
		case perr != nil || len(hex) != 16:
		case kind == "snap":
			snaps = append(snaps, seq)
		case kind == "log":
			logs = append(logs, seq)
		}
	}
	slices.Sort(snaps)
	slices.Sort(logs)
	return snaps, logs, nil
}

// recover loads the newest snapshot and replays the logs after it, and
// leaves d.seg open at the end of the last log; or, in a new directory,
// starts both.
func (d *dataDir) recover() error {
	snaps, logs, err := d.files()
	if err != nil {
		return err
	}
	if len(snaps) == 0 {
		if len(logs) > 0 {
			return fmt.Errorf("%s: no snapshot holds the changes before it: files of the data directory are missing", d.path("log", logs[0]))
		}
		base := (1 + rand.Int64N(1<<20)) << 32 // as NewStore's
		if err := d.writeSnapshot(base); err != nil {
			return err
		}
		d.s.startSequence(base)
		d.seg, err = d.createLog(base + 1)
		return err
	}
	snap := snaps[len(snaps)-1]
	if err := d.loadSnapshot(snap); err != nil {
		return err
	}
	d.s.startSequence(snap)
	// Replay from the log that holds the change after the snapshot.
	start := -1
	for i, first := range logs {
		if first <= snap+1 {
			start = i
		}
	}
	if start < 0 {
		if len(logs) > 0 {
			return fmt.Errorf("%s: starts at change %d, but %s ends at change %d: the changes between are missing",
				d.path("log", logs[0]), logs[0], d.path("snap", snap), snap)
		}
		d.seg, err = d.createLog(snap + 1)
		return err
	}
	next := logs[start] // the number the next record must have
	for i, first := range logs[start:] {
		if first != next {
			return fmt.Errorf("%s: starts at change %d, but the log before ends at change %d: the changes between are missing",
				d.path("log", first), first, next-1)
		}
		last := start+i == len(logs)-1
		if next, err = d.replay(first, next, snap, last); err != nil {
			return err
		}
	}
	d.s.published.Store(d.s.seq)
	d.removeBefore(snap) // what an interrupted compaction left
	d.seg, err = os.OpenFile(d.path("log", logs[len(logs)-1]), os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	return nil
}

// createLog creates the log whose first change is first, durably.
func (d *dataDir) createLog(first int64) (*os.File, error) {
	path := d.path("log", first)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	head := appendRecord(nil, appendHeader(nil, 'L', first))
	if _, err = f.Write(head); err == nil {
		if err = f.Sync(); err == nil {
			err = syncDir(d.dir)
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("creating %s: %w", path, err)
	}
	d.logSize.Add(int64(len(head)))
	return f, nil
}

// replay applies the log that starts at change first: each change
// numbered next, next+1, ..., those after snap to the store. It returns
// the number the following change must have. A record cut short at the
// end of the last log is a crash mid-write: it is dropped, with a warning,
// and the log truncated there.
func (d *dataDir) replay(first, next, snap int64, last bool) (int64, error) {
	path := d.path("log", first)
	rr, f, err := openRecords(path)
	if err != nil {
		return next, err
	}
	defer f.Close()
	if err := rr.header('L', first); err != nil {
		return next, err
	}
	for {
		body, err := rr.next()
		switch {
		case err == io.EOF:
			return next, nil
		case errors.Is(err, errTorn) && last:
			d.log.Warn("data files: the last record was cut short by a crash; dropped", "file", path, "offset", rr.off, "reason", err)
			if err := os.Truncate(path, rr.off); err != nil {
				return next, fmt.Errorf("truncating %s: %w", path, err)
			}
			return next, nil
		case err != nil:
			return next, err
		}
		c, expires, err := decodeChange(body)
		switch {
		case err != nil:
			return next, rr.damaged(err.Error())
		case c.seq != next:
			return next, rr.damaged(fmt.Sprintf("change %d where change %d belongs", c.seq, next))
		}
		next++
		if c.seq <= snap {
			continue // in the snapshot already
		}
		d.apply(c, expires)
		d.s.seq = c.seq // recovery runs alone: seqMu guards nothing yet
		d.s.history.add(c.key)
	}
}

// apply puts a recovered key's version in the store: its deadline is
// absolute, so a key that expired while the server was down stays gone.
func (d *dataDir) apply(c change, expires int64) {
	if c.e != nil && expires != 0 {
		if expires <= d.s.now() {
			c.e = nil
		} else {
			c.e.ttl = &deadline{at: expires, key: c.key, index: -1}
		}
	}
	d.s.load(c.key, c.e)
}

// writeSnapshot writes every key of the store to the snapshot as of
// change upTo: to a temporary file, made durable, then renamed into
// place, and the directory made durable.
func (d *dataDir) writeSnapshot(upTo int64) error {
	path := d.path("snap", upTo)
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	defer os.Remove(tmp) // if it is still there, it failed
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
	now := d.s.now()
	d.s.keys.Range(func(k, v any) bool {
		e := v.(*slot).cur.Load()
		if e == nil || e == tombstone || e.ttl != nil && e.ttl.at <= now {
			return true
		}
		block = appendSnapshotKey(block, k.(string), e)
		count++
		if len(block) >= 64<<10 {
			put(block)
			block = block[:1]
		}
		return true
	})
	if len(block) > 1 {
		put(block)
	}
	put(binary.AppendUvarint([]byte{'E'}, count))
	err = w.Flush()
	if err == nil {
		err = d.sync(f)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(d.dir)
	}
	if err != nil {
		return fmt.Errorf("writing snapshot %s: %w", path, err)
	}
	d.snapBytes.Store(written)
	return nil
}

// loadSnapshot loads the snapshot as of change upTo into the store.
func (d *dataDir) loadSnapshot(upTo int64) error {
	path := d.path("snap", upTo)
	rr, f, err := openRecords(path)
	if err != nil {
		return err
	}
	defer f.Close()
	d.snapBytes.Store(rr.size)
	if err := rr.header('S', upTo); err != nil {
		return err
	}
	var count uint64
	for {
		body, err := rr.next()
		switch {
		case err == io.EOF:
			return rr.damaged("the snapshot ends before its end record")
		case err != nil:
			return err // cut short too: a snapshot is renamed into place whole
		}
		switch body[0] {
		case 'B':
			for rest := body[1:]; len(rest) > 0; {
				var key string
				var e *entry
				var expires int64
				if key, e, expires, rest, err = decodeSnapshotKey(rest); err != nil {
					return rr.damaged(err.Error())
				}
				d.apply(change{key: key, e: e}, expires)
				count++
			}
		case 'E':
			want, n := binary.Uvarint(body[1:])
			if n <= 0 || want != count {
				return rr.damaged(fmt.Sprintf("the snapshot ends after %d keys, but says it holds %d", count, want))
			}
			return nil
		default:
			return rr.damaged(fmt.Sprintf("unknown record %q", body[0]))
		}
	}
}

// Records.

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

const (
	headerSize = 12
	maxRecord  = 256 << 20 // a larger length is damage, not data
	dataMagic  = "atomkv"
	dataFormat = 1
)

// appendRecord appends body, framed.
func appendRecord(b, body []byte) []byte {
	start := len(b)
	b = append(b, make([]byte, headerSize)...)
	b = append(b, body...)
	frame(b[start:])
	return b
}

// frame fills in the header of the record rec, whose body follows it.
func frame(rec []byte) {
	body := rec[headerSize:]
	binary.LittleEndian.PutUint32(rec[0:], uint32(len(body)))
	binary.LittleEndian.PutUint32(rec[4:], crc32.Checksum(body, castagnoli))
	binary.LittleEndian.PutUint32(rec[8:], crc32.Checksum(rec[:8], castagnoli))
}

// appendHeader appends the body of a file's first record.
func appendHeader(b []byte, kind byte, first int64) []byte {
	b = append(b, 'H')
	b = append(b, dataMagic...)
	b = binary.AppendUvarint(b, dataFormat)
	b = append(b, kind)
	return binary.AppendUvarint(b, uint64(first))
}

// appendChange appends the record of a change to the log.
func appendChange(b []byte, c change) []byte {
	start := len(b)
	b = append(b, make([]byte, headerSize)...)
	switch {
	case c.e != nil:
		b = append(b, 'S')
		b = binary.AppendUvarint(b, uint64(c.seq))
		b = binary.AppendUvarint(b, uint64(c.e.revision))
		b = binary.AppendVarint(b, c.e.deadline())
		b = binary.AppendUvarint(b, uint64(len(c.key)))
		b = append(b, c.key...)
		b = append(b, c.e.value...)
	case c.why == expired:
		b = append(b, 'X')
		b = binary.AppendUvarint(b, uint64(c.seq))
		b = append(b, c.key...)
	default:
		b = append(b, 'D')
		b = binary.AppendUvarint(b, uint64(c.seq))
		b = append(b, c.key...)
	}
	frame(b[start:])
	return b
}

// deadline returns when e expires, in Unix ns, or 0.
func (e *entry) deadline() int64 {
	if e.ttl == nil {
		return 0
	}
	return e.ttl.at
}

// decodeChange reads a change record's body.
func decodeChange(body []byte) (c change, expires int64, err error) {
	r := byteReader{b: body[1:]}
	c.seq = int64(r.uvarint())
	switch body[0] {
	case 'S':
		c.e = &entry{revision: int64(r.uvarint())}
		expires = r.varint()
		c.key = r.string(int(r.uvarint()))
		c.e.value = string(r.b)
	case 'D', 'X':
		c.key, c.why = string(r.b), deleted
		if body[0] == 'X' {
			c.why = expired
		}
	default:
		return c, 0, fmt.Errorf("unknown record %q", body[0])
	}
	if r.err != nil || c.key == "" {
		return c, 0, errors.New("malformed change record")
	}
	return c, expires, nil
}

// appendSnapshotKey appends a key and its version to a snapshot block.
func appendSnapshotKey(b []byte, key string, e *entry) []byte {
	b = binary.AppendUvarint(b, uint64(len(key)))
	b = append(b, key...)
	b = binary.AppendUvarint(b, uint64(len(e.value)))
	b = append(b, e.value...)
	b = binary.AppendUvarint(b, uint64(e.revision))
	return binary.AppendVarint(b, e.deadline())
}

// decodeSnapshotKey reads a key and its version from a snapshot block,
// and returns the rest of the block.
func decodeSnapshotKey(b []byte) (key string, e *entry, expires int64, rest []byte, err error) {
	r := byteReader{b: b}
	key = r.string(int(r.uvarint()))
	e = &entry{value: r.string(int(r.uvarint()))}
	e.revision = int64(r.uvarint())
	expires = r.varint()
	if r.err != nil || key == "" {
		return "", nil, 0, nil, errors.New("malformed snapshot block")
	}
	return key, e, expires, r.b, nil
}

// byteReader reads varints and strings from a record body, keeping the
// first error.
type byteReader struct {
	b   []byte
	err error
}

func (r *byteReader) uvarint() uint64 {
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = io.ErrUnexpectedEOF
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *byteReader) varint() int64 {
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.err = io.ErrUnexpectedEOF
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *byteReader) string(n int) string {
	if n < 0 || n > len(r.b) {
		r.err = io.ErrUnexpectedEOF
		return ""
	}
	s := string(r.b[:n])
	r.b = r.b[n:]
	return s
}

// errTorn is the end of a file inside a record, as a crash mid-write
// leaves it.
var errTorn = errors.New("the file ends inside a record")

// recordReader reads the records of a file.
type recordReader struct {
	path string
	r    *bufio.Reader
	off  int64 // of the next record
	size int64
	body []byte
}

func openRecords(path string) (*recordReader, *os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("data directory: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("data directory: %w", err)
	}
	return &recordReader{path: path, r: bufio.NewReaderSize(f, 256<<10), size: fi.Size()}, f, nil
}

// damaged is the error of damage at the current record.
func (rr *recordReader) damaged(what string) error {
	return fmt.Errorf("%s: damaged at offset %d: %s", rr.path, rr.off, what)
}

// next returns the next record's body, valid until the next call; io.EOF
// at the end of the file; an error wrapping errTorn if the file ends
// inside a record; or damage.
func (rr *recordReader) next() ([]byte, error) {
	left := rr.size - rr.off
	switch {
	case left == 0:
		return nil, io.EOF
	case left < headerSize:
		return nil, fmt.Errorf("%w: %d bytes of a header", errTorn, left)
	}
	var h [headerSize]byte
	if _, err := io.ReadFull(rr.r, h[:]); err != nil {
		return nil, fmt.Errorf("reading %s: %w", rr.path, err)
	}
	n := int64(binary.LittleEndian.Uint32(h[0:]))
	if crc32.Checksum(h[:8], castagnoli) != binary.LittleEndian.Uint32(h[8:]) {
		if h == [headerSize]byte{} && rr.zeroToEnd() {
			// A crash after the file grew and before its data landed
			// leaves zeroes.
			return nil, fmt.Errorf("%w: zeroes to the end", errTorn)
		}
		return nil, rr.damaged("bad record header checksum")
	}
	switch {
	case n > maxRecord:
		return nil, rr.damaged(fmt.Sprintf("a record of %d bytes", n))
	case n > left-headerSize:
		return nil, fmt.Errorf("%w: %d of its %d bytes", errTorn, left-headerSize, n)
	case n == 0:
		return nil, rr.damaged("an empty record")
	}
	rr.body = slices.Grow(rr.body[:0], int(n))[:n]
	if _, err := io.ReadFull(rr.r, rr.body); err != nil {
		return nil, fmt.Errorf("reading %s: %w", rr.path, err)
	}
	if crc32.Checksum(rr.body, castagnoli) != binary.LittleEndian.Uint32(h[4:]) {
		if n == left-headerSize {
			// The very last record, whole in length but not in
			// content: a write the crash cut, as far as anyone can tell.
			return nil, fmt.Errorf("%w: the last record's checksum fails", errTorn)
		}
		return nil, rr.damaged("bad record checksum")
	}
	rr.off += headerSize + n
	return rr.body, nil
}

// zeroToEnd reports whether the rest of the file is zeroes.
func (rr *recordReader) zeroToEnd() bool {
	for {
		c, err := rr.r.ReadByte()
		if err == io.EOF {
			return true
		}
		if err != nil || c != 0 {
			return false
		}
	}
}

// header checks a file's first record: its kind and number.
func (rr *recordReader) header(kind byte, first int64) error {
	body, err := rr.next()
	if err != nil {
		if err == io.EOF || errors.Is(err, errTorn) {
			return rr.damaged("no header record")
		}
		return err
	}
	want := appendHeader(nil, kind, first)
	if !bytes.Equal(body, want) {
		return rr.damaged(fmt.Sprintf("header %q; want %q", body, want))
	}
	return nil
}

// syncDir makes the entries of a directory durable.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
