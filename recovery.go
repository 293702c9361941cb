// Recovery (-data): at start-up, the newest snapshot is loaded and the
// logs after it replayed into the store, through its restore hooks; what
// a crash leaves (data.go's comment lists it) is mended, and anything
// else stops the server with the file and the offset.

package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// files lists the snapshots and logs in the directory, in order, and
// removes temporary files a crash left behind.
func (d *dataDir) files() (snaps, logs []int64, err error) {
	names, err := d.fs.readDir(d.dir)
	if err != nil {
		return nil, nil, fmt.Errorf("data directory: %w", err)
	}
	for _, name := range names {
		kind, hex, _ := strings.Cut(name, "-")
		seq, perr := strconv.ParseInt(hex, 16, 64)
		switch {
		case strings.HasSuffix(name, ".tmp"):
			d.fs.remove(filepath.Join(d.dir, name)) // a snapshot never finished
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
	headerless := false
	for i, first := range logs[start:] {
		if first != next {
			return fmt.Errorf("%s: starts at change %d, but the log before ends at change %d: the changes between are missing",
				d.path("log", first), first, next-1)
		}
		last := start+i == len(logs)-1
		if next, headerless, err = d.replay(first, next, snap, last); err != nil {
			return err
		}
	}
	d.removeBefore(snap) // what an interrupted compaction left
	newest := logs[len(logs)-1]
	if headerless {
		d.seg, err = d.createLog(newest)
		return err
	}
	f, err := d.fs.openAppend(d.path("log", newest))
	if err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	d.seg = logFile{f, d.path("log", newest)}
	return nil
}

// openRecords opens the records of a file.
func (d *dataDir) openRecords(path string) (*recordReader, dataFile, error) {
	f, size, err := d.fs.open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("data directory: %w", err)
	}
	return newRecordReader(path, f, size), f, nil
}

// replay applies the log that starts at change first: each change
// numbered next, next+1, ..., those after snap to the store. It returns
// the number the following change must have. A record cut short at the
// end of the last log is a crash mid-write: it is dropped, with a warning,
// and the log truncated there. A last log without a whole header is a
// crash as it was created: headerless says so, and it is written again.
func (d *dataDir) replay(first, next, snap int64, last bool) (_ int64, headerless bool, _ error) {
	path := d.path("log", first)
	rr, f, err := d.openRecords(path)
	if err != nil {
		return next, false, err
	}
	defer f.Close()
	if err := rr.header('L', first); err != nil {
		if last && errors.Is(err, errNoHeader) {
			d.log.Warn("data files: the newest log has no header: a crash as it was created; written again", "file", path, "bytes", rr.size)
			return next, true, nil
		}
		return next, false, err
	}
	for {
		body, err := rr.next()
		switch {
		case err == io.EOF:
			return next, false, nil
		case errors.Is(err, errTorn) && last:
			d.log.Warn("data files: the last record was cut short by a crash; dropped", "file", path, "offset", rr.off, "reason", err)
			if err := d.fs.truncate(path, rr.off); err != nil {
				return next, false, fmt.Errorf("truncating %s: %w", path, err)
			}
			return next, false, nil
		case err != nil:
			return next, false, asDamage(err) // torn before the end of the newest log: no crash does that
		}
		changes, expires, err := decodeChanges(body)
		switch {
		case err != nil:
			return next, false, rr.damaged(err.Error())
		case changes[0].seq != next:
			return next, false, rr.damaged(fmt.Sprintf("change %d where change %d belongs", changes[0].seq, next))
		}
		next++
		if changes[0].seq <= snap {
			continue // in the snapshot already
		}
		d.s.replay(d.deadlines(changes, expires))
	}
}

// deadlines gives each replayed version its deadline, expires (absolute:
// a key that expired while the server was down stays gone, as missing).
func (d *dataDir) deadlines(changes []change, expires []int64) []change {
	now := d.s.now()
	for i := range changes {
		c := &changes[i]
		switch at := expires[i]; {
		case c.e == nil || at == 0:
		case at <= now:
			c.e, c.why = nil, expired
		default:
			c.e.ttl = &deadline{at: at, key: c.key, index: -1}
		}
	}
	return changes
}

// loadSnapshot loads the snapshot as of change upTo into the store.
func (d *dataDir) loadSnapshot(upTo int64) error {
	path := d.path("snap", upTo)
	rr, f, err := d.openRecords(path)
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
			return asDamage(err) // cut short too: a snapshot is renamed into place whole
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
				d.s.restore(key, e, expires)
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
