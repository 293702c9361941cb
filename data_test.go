package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestDataRestart: a server with -data, stopped and started again, holds
// every key byte for byte, with its revision, its TTL counting down (or
// gone if it ran out while the server was down), and its change sequence,
// so that a client resumes across the restart.
func TestDataRestart(t *testing.T) {
	dir := t.TempDir()
	url, stop := startStoppable(t, "-data", dir)
	values := map[string]string{}
	for i, key := range oddKeys[:12] {
		value := fmt.Sprintf(`{"n":12345678901234567890,"i":%d,"s":"ключ \"q\" \u2028"}`, i)
		do(t, "POST", url+keyURL(key), `0`)
		do(t, "POST", url+keyURL(key), value)
		values[key] = value
	}
	do(t, "POST", url+"/ttl/long", `1`, "X-TTL", "1h")
	do(t, "POST", url+"/ttl/short", `1`, "X-TTL", "300ms")
	shortDeadline := time.Now().Add(300 * time.Millisecond)
	do(t, "POST", url+"/gone", `1`)
	do(t, "DELETE", url+"/gone", "")
	do(t, "PUT", url+"/cas", `"c"`, "X-Revision", "0")
	before := do(t, "GET", url+"/ttl/long", "").header.Get("X-TTL")
	ch, stopStream := openStream(t, url, "/?initial")
	_, _, synced := untilSynced(t, ch)
	stopStream()
	stop()

	time.Sleep(time.Until(shortDeadline)) // the deadline passes while the server is down
	url, stop = startStoppable(t, "-data", dir)
	defer stop()
	for key, value := range values {
		if r := do(t, "GET", url+keyURL(key), ""); r.code != 200 || r.body != value || r.header.Get("X-Revision") != "1" {
			t.Errorf("after restart, %q: got %d %s revision %s; want %s revision 1", key, r.code, r.body, r.header.Get("X-Revision"), value)
		}
	}
	after, _ := strconv.Atoi(do(t, "GET", url+"/ttl/long", "").header.Get("X-TTL"))
	if b, _ := strconv.Atoi(before); after <= 0 || after > b {
		t.Errorf("TTL of /ttl/long: %s ms before the restart, %d after; want it counting on down", before, after)
	}
	for _, key := range []string{"/ttl/short", "/gone"} {
		if r := do(t, "GET", url+key, ""); r.code != 404 {
			t.Errorf("%s after restart: got %d %s; want 404", key, r.code, r.body)
		}
	}
	if r := do(t, "PUT", url+"/cas", `"d"`, "X-Revision", "1"); r.code != 200 {
		t.Errorf("CAS after restart: got %d %s; want 200 (revisions continue)", r.code, r.body)
	}
	// Resuming from before the restart: nothing is missed (the change
	// just made) and nothing resets.
	ch, _ = openStream(t, url, "/", "Last-Event-ID", synced.id)
	got, _, resumed := untilSynced(t, ch)
	if len(got) != 1 || got[0] != `/cas:1="d"` || resumed.seq != synced.seq+1 {
		t.Errorf("resumed across the restart from %d: got %v, synced at %d; want /cas:1=\"d\" and %d", synced.seq, got, resumed.seq, synced.seq+1)
	}
}

// openTestData opens dir as a store's data directory, with compaction
// once the logs pass minCompact bytes, and closes it when the test ends.
func openTestData(t *testing.T, dir string, mode fsyncMode, minCompact int64, log *slog.Logger) (*Store, *dataDir) {
	t.Helper()
	if log == nil {
		log = discardLogger()
	}
	s := NewStore(0, nil)
	d, err := loadData(dir, mode, s, log)
	if err != nil {
		t.Fatal(err)
	}
	d.minCompact = minCompact
	d.awaitCompaction = true // as many compactions as the writes make due, every run
	d.start()
	t.Cleanup(func() { d.close() })
	return s, d
}

// state is a store's keys as revision=value, for comparing.
func state(s *Store) map[string]string {
	m := map[string]string{}
	for _, it := range s.List("/") {
		m[it.key] = fmt.Sprintf("%d=%s", it.revision, it.value)
	}
	return m
}

// dirSize is the bytes of a directory's snapshots and logs.
func dirSize(t testing.TB, dir string) (size int64, names []string) {
	t.Helper()
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if fi, err := e.Info(); err == nil && e.Name() != "LOCK" {
			size += fi.Size()
			names = append(names, e.Name())
		}
	}
	return size, names
}

// TestDataCompaction: while writers change keys and readers read them,
// the logs grow past four times the live data and are compacted into a
// snapshot, again and again; afterwards the files are about the size of
// the live data, and the store opened again is the same. The writers
// write a fixed amount, which makes a rotation due about 7 times (each
// made: awaitCompaction), rather than until 3 compactions were seen,
// which under load took longer than any deadline a test can set.
func TestDataCompaction(t *testing.T) {
	dir := t.TempDir()
	s, d := openTestData(t, dir, fsyncNever, 16<<10, nil)
	var stop atomic.Bool
	var wg, writers sync.WaitGroup
	for w := range 4 {
		writers.Add(1)
		go func() { // each key's value is its revision
			defer writers.Done()
			for i := range 4000 {
				key := fmt.Sprintf("/k/%d/%d", w, i%50)
				cur := s.Get(key)
				next := int64(0)
				if cur != nil {
					next = cur.revision + 1
				}
				if i%97 == 0 {
					s.Delete(key, -1)
					continue
				}
				s.CompareAndSwap(key, strconv.FormatInt(next, 10), next, 0)
			}
		}()
	}
	var reads atomic.Int64
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				for _, it := range s.List("/k/") {
					if it.value != strconv.FormatInt(it.revision, 10) {
						t.Errorf("read %s at revision %d = %s", it.key, it.revision, it.value)
					}
				}
				reads.Add(1)
			}
		}()
	}
	writers.Wait()
	stop.Store(true)
	wg.Wait()
	d.compaction.Wait()
	if n := d.snapshots.Load(); n < 3 {
		t.Fatalf("%d compactions; want at least 3", n)
	}
	live := s.liveBytes.Load()
	size, names := dirSize(t, dir)
	t.Logf("%d compactions, %d reads meanwhile; files %v: %d bytes for %d bytes of keys and values", d.snapshots.Load(), reads.Load(), names, size, live)
	if size > 2*live+(16<<10)*5 { // the logs since the last compaction may hold up to 4× the minimum
		t.Errorf("after compaction: %d bytes of files for %d bytes of live data", size, live)
	}
	want := state(s)
	d.close()
	s2, _ := openTestData(t, dir, fsyncNever, 16<<10, nil)
	if got := state(s2); !mapsEqual(got, want) {
		t.Errorf("reopened after compactions: %d keys, want %d; differ", len(got), len(want))
	}
}

// TestDataGroupCommit: changes committed while the flusher is busy share
// its next write and, with -fsync always, its one fsync; and none of
// their writers is answered before it.
func TestDataGroupCommit(t *testing.T) {
	s := NewStore(0, nil)
	d, err := loadData(t.TempDir(), fsyncAlways, s, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	const n = 64
	var answered atomic.Int64
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.Set(fmt.Sprintf("/g/%d", i), "1", 0); err != nil {
				t.Error(err)
			}
			answered.Add(1)
		}()
	}
	waitFor(t, "every write to be committed", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		return len(d.queued.changes) == n
	})
	if a := answered.Load(); a != 0 {
		t.Fatalf("%d writes answered before their record was written", a)
	}
	if got := len(s.List("/g/")); got != 0 {
		t.Errorf("%d keys visible before their records were written; want 0", got)
	}
	fsyncs := d.fsyncs.Load()
	d.write(d.take())
	if got := d.fsyncs.Load() - fsyncs; got != 1 {
		t.Errorf("%d writes took %d fsyncs; want 1", n, got)
	}
	wg.Wait()
	if got := len(s.List("/g/")); got != n {
		t.Errorf("%d keys visible after; want %d", got, n)
	}
	d.start()
	d.close()
}

// TestDataWriteFails: a change the log cannot take is not acknowledged
// nor shown to readers; the server is told to stop (fail-stop), later
// writes fail at once, and an HTTP write gets 503 with a clear message.
func TestDataWriteFails(t *testing.T) {
	s := NewStore(0, nil)
	d, err := loadData(t.TempDir(), fsyncNever, s, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	d.seg.f.Close() // as a disk that fails
	d.start()
	defer d.close()
	if _, err := s.Set("/x", "1", 0); err != errNotWritten {
		t.Errorf("a write the log could not take: %v; want errNotWritten", err)
	}
	if e := s.Get("/x"); e != nil {
		t.Errorf("GET of the write that failed: %v; want nothing", e)
	}
	select {
	case <-d.failed:
	default:
		t.Error("the server was not told to stop")
	}
	if _, err := s.CompareAndSwap("/y", "1", 0, 0); err != errNotWritten {
		t.Errorf("a later write: %v; want errNotWritten", err)
	}
	srv := &server{log: discardLogger()}
	rec := httptest.NewRecorder()
	srv.serveWritten(rec, nil, errNotWritten)
	if rec.Code != 503 || !strings.Contains(rec.Body.String(), "could not write its data files") {
		t.Errorf("HTTP: got %d %s; want 503 and why", rec.Code, rec.Body)
	}
}

// writeThenClose writes changes to a new data directory and closes it,
// and returns its one log's path.
func writeThenClose(t *testing.T, n int) (dir, log string) {
	t.Helper()
	dir = t.TempDir()
	s, d := openTestData(t, dir, fsyncNever, 1<<30, nil)
	for i := range n {
		s.Set(fmt.Sprintf("/k/%d", i), fmt.Sprintf(`"value %d"`, i), 0)
	}
	s.Delete("/k/0", -1)
	d.close()
	logs, _ := filepath.Glob(filepath.Join(dir, "log-*"))
	if len(logs) != 1 {
		t.Fatalf("logs %v; want one", logs)
	}
	return dir, logs[0]
}

// TestDataTornTail: a log whose last record a crash cut short (or left
// as zeroes) loads without that record, with a warning naming the file,
// and is truncated there; writes go on after it.
func TestDataTornTail(t *testing.T) {
	for _, tt := range []struct {
		name string
		tear func(t *testing.T, log string)
	}{
		{"cut short", func(t *testing.T, log string) {
			fi, _ := os.Stat(log)
			os.Truncate(log, fi.Size()-3)
		}},
		{"zeroes at the end", func(t *testing.T, log string) {
			f, _ := os.OpenFile(log, os.O_WRONLY|os.O_APPEND, 0)
			f.Write(make([]byte, 4096))
			f.Close()
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir, log := writeThenClose(t, 10)
			fi, _ := os.Stat(log)
			tt.tear(t, log)
			var logged bytes.Buffer
			s, d := openTestData(t, dir, fsyncNever, 1<<30, slog.New(slog.NewTextHandler(&logged, nil)))
			warning := fmt.Sprintf("level=WARN msg=\"data files: the last record was cut short by a crash; dropped\" file=%s", log)
			if !strings.Contains(logged.String(), warning) {
				t.Errorf("log %q; want a warning naming %s", logged.String(), log)
			}
			switch got := len(s.List("/")); {
			case tt.name == "cut short" && (got != 10 || s.Get("/k/0") == nil):
				t.Errorf("%d keys after loading; want 10: the last record, the delete of /k/0, dropped", got)
			case tt.name == "zeroes at the end" && got != 9:
				t.Errorf("%d keys after loading; want 9: every record kept", got)
			}
			if after, _ := os.Stat(log); tt.name == "zeroes at the end" && after.Size() != fi.Size() {
				t.Errorf("log of %d bytes, %d before the zeroes; want it truncated back", after.Size(), fi.Size())
			}
			checkGoesOn(t, dir, s, d)
		})
	}
}

// checkGoesOn writes a key to s, closes its data directory and opens it
// again: it must hold what s held, that write included.
func checkGoesOn(t *testing.T, dir string, s *Store, d *dataDir) {
	t.Helper()
	s.Set("/after", "1", 0)
	want := state(s)
	d.close()
	s2, _ := openTestData(t, dir, fsyncNever, 1<<30, nil)
	if got := state(s2); !mapsEqual(got, want) {
		t.Errorf("written after loading, then reopened: %v; want %v", got, want)
	}
}

// TestDataHeaderlessLog: a newest log a crash left empty, zero-filled or
// cut inside its header (between its creation and its header reaching
// the disk) is a torn tail, not damage: the server starts with every
// change, with a warning naming the file, writes the header again, and
// goes on.
func TestDataHeaderlessLog(t *testing.T) {
	for name, contents := range map[string][]byte{
		"empty":       nil,
		"zeroes":      make([]byte, 4096),
		"half header": appendRecord(nil, appendHeader(nil, 'L', 1))[:7],
	} {
		t.Run(name, func(t *testing.T) {
			dir, log := writeThenClose(t, 10)
			first, _ := strconv.ParseInt(strings.TrimPrefix(filepath.Base(log), "log-"), 16, 64)
			newest := filepath.Join(dir, fmt.Sprintf("log-%016x", first+11)) // after the 11 changes the log holds
			os.WriteFile(newest, contents, 0o644)
			var logged bytes.Buffer
			s, d := openTestData(t, dir, fsyncNever, 1<<30, slog.New(slog.NewTextHandler(&logged, nil)))
			if want := "file=" + newest; !strings.Contains(logged.String(), "the newest log has no header") || !strings.Contains(logged.String(), want) {
				t.Errorf("log %q; want a warning naming %s", logged.String(), newest)
			}
			if got := len(s.List("/")); got != 9 {
				t.Errorf("%d keys; want 9", got)
			}
			checkGoesOn(t, dir, s, d)
		})
	}
}

// TestDataDamage: damage anywhere but a torn last record stops loading
// with an error naming the file and the offset, and leaves the files as
// they were.
func TestDataDamage(t *testing.T) {
	flip := func(path string, off int64) {
		b, _ := os.ReadFile(path)
		b[off] ^= 0x20
		os.WriteFile(path, b, 0o644)
	}
	// The log's records: a header, then the changes; the offset of the
	// third change's record, and of one in the middle of its body.
	recordAt := func(t *testing.T, log string, n int) int64 {
		rr, f, err := (&dataDir{fs: osFS{}}).openRecords(log)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for range n {
			rr.next()
		}
		return rr.off
	}
	for _, tt := range []struct {
		name   string
		damage func(t *testing.T, dir, log string) // returns nothing; the error is checked against want
		want   string                              // a regexp
	}{
		{"a flipped byte in the middle of the log", func(t *testing.T, dir, log string) {
			flip(log, recordAt(t, log, 3)+headerSize+4)
		}, `log-[0-9a-f]{16}: damaged at offset (\d+): bad record checksum`},
		{"a flipped length", func(t *testing.T, dir, log string) {
			flip(log, recordAt(t, log, 3)+1)
		}, `log-[0-9a-f]{16}: damaged at offset (\d+): bad record header checksum`},
		{"a flipped byte in the snapshot", func(t *testing.T, dir, log string) {
			snaps, _ := filepath.Glob(filepath.Join(dir, "snap-*"))
			flip(snaps[0], headerSize+2)
		}, `snap-[0-9a-f]{16}: damaged at offset (0): bad record checksum`},
		{"a snapshot cut short", func(t *testing.T, dir, log string) {
			snaps, _ := filepath.Glob(filepath.Join(dir, "snap-*"))
			fi, _ := os.Stat(snaps[0])
			os.Truncate(snaps[0], fi.Size()-2)
		}, `snap-[0-9a-f]{16}: damaged at offset \d+: the file ends inside a record: \d+ of its \d+ bytes`},
		{"a log cut short before the newest", func(t *testing.T, dir, log string) {
			os.Truncate(log, recordAt(t, log, 3)+headerSize+2)
			first, _ := strconv.ParseInt(strings.TrimPrefix(filepath.Base(log), "log-"), 16, 64)
			newer := filepath.Join(dir, fmt.Sprintf("log-%016x", first+1000))
			os.WriteFile(newer, appendRecord(nil, appendHeader(nil, 'L', first+1000)), 0o644)
		}, `log-[0-9a-f]{16}: damaged at offset (\d+): the file ends inside a record: 2 of its \d+ bytes`},
		{"no snapshot", func(t *testing.T, dir, log string) {
			snaps, _ := filepath.Glob(filepath.Join(dir, "snap-*"))
			os.Remove(snaps[0])
		}, `log-[0-9a-f]{16}: no snapshot holds the changes before it`},
		{"a gap before the log", func(t *testing.T, dir, log string) {
			first, _ := strconv.ParseInt(strings.TrimPrefix(filepath.Base(log), "log-"), 16, 64)
			os.Rename(log, filepath.Join(dir, fmt.Sprintf("log-%016x", first+5)))
		}, `log-[0-9a-f]{16}: starts at change \d+, but \S*snap-[0-9a-f]{16} ends at change \d+: the changes between are missing`},
		{"a change out of sequence", func(t *testing.T, dir, log string) {
			// A valid record, but for a change that does not follow.
			f, _ := os.OpenFile(log, os.O_WRONLY|os.O_APPEND, 0)
			f.Write(appendChange(nil, change{key: "/x", e: &entry{value: "1"}, seq: 1}))
			f.Write(appendChange(nil, change{key: "/y", e: &entry{value: "1"}, seq: 2}))
			f.Close()
		}, `log-[0-9a-f]{16}: damaged at offset (\d+): change 1 where change \d+ belongs`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir, log := writeThenClose(t, 10)
			before, _ := os.Stat(log)
			tt.damage(t, dir, log)
			size, names := dirSize(t, dir)
			_, err := loadData(dir, fsyncNever, NewStore(0, nil), discardLogger())
			if err == nil || !regexp.MustCompile(tt.want).MatchString(err.Error()) {
				t.Fatalf("loading: %v; want an error matching %s", err, tt.want)
			}
			if m := regexp.MustCompile(tt.want).FindStringSubmatch(err.Error()); len(m) > 1 && m[1] != "0" {
				want := fmt.Sprint(recordAt(t, log, 3))
				if tt.name == "a change out of sequence" {
					want = fmt.Sprint(before.Size()) // the record appended
				}
				if m[1] != want {
					t.Errorf("offset %s; want %s, the damaged record's", m[1], want)
				}
			}
			if !strings.Contains(err.Error(), dir) {
				t.Errorf("error %q does not name the file's path", err)
			}
			if size2, names2 := dirSize(t, dir); size2 != size || len(names2) != len(names) {
				t.Errorf("files changed by a failed load: %v (%d bytes), before %v (%d bytes)", names2, size2, names, size)
			}
		})
	}

	t.Run("the server refuses to start", func(t *testing.T) {
		dir, log := writeThenClose(t, 10)
		flip(log, recordAt(t, log, 3)+headerSize+4)
		err := run(context.Background(), []string{"-addr", "127.0.0.1:0", "-data", dir}, func(string) string { return "" }, io.Discard)
		if err == nil || !strings.Contains(err.Error(), "damaged at offset") {
			t.Errorf("run: %v; want the damage", err)
		}
	})
}

// TestDataLocked: one server per directory; a second gets a clear error,
// and the directory is free once the first is gone.
func TestDataLocked(t *testing.T) {
	dir := t.TempDir()
	_, stop := startStoppable(t, "-data", dir)
	err := run(context.Background(), []string{"-addr", "127.0.0.1:0", "-data", dir}, func(string) string { return "" }, io.Discard)
	want := fmt.Sprintf("data directory %s is in use by another atomkv (pid %d)", dir, os.Getpid())
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("a second server: %v; want %q", err, want)
	}
	stop()
	startServer(t, "-data", dir)
}

// TestDataUnwritable: a data directory that cannot be made or written is
// a clear error at start.
func TestDataUnwritable(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	dirs := map[string]string{filepath.Join(file, "data"): "not a directory"}
	if os.Getuid() != 0 { // root writes anywhere
		ro := filepath.Join(t.TempDir(), "ro")
		os.Mkdir(ro, 0o500)
		dirs[ro] = "permission denied"
	} else {
		t.Log("running as root: a read-only directory is writable; checking a path under a file only")
	}
	for dir, want := range dirs {
		err := run(context.Background(), []string{"-addr", "127.0.0.1:0", "-data", dir}, func(string) string { return "" }, io.Discard)
		if err == nil || !strings.Contains(err.Error(), "data directory") || !strings.Contains(err.Error(), want) {
			t.Errorf("-data %s: %v; want a data directory error: %s", dir, err, want)
		}
	}
}

// TestDataCrash runs the real server (this test binary, as main) under 8
// writers doing compare-and-swap increments, writes and deletes, kills it
// with SIGKILL at a random moment, starts it again on the same directory,
// and checks, 20 times: every acknowledged write is there, no counter
// went backwards, revisions go on without reuse, and the change sequence
// goes on from where the events sent before the kill left it. With
// -fsync never too: a kill is not a power failure, and a write is
// acknowledged only after write(2).
func TestDataCrash(t *testing.T) {
	rounds := 20
	if testing.Short() {
		rounds = 3
	}
	for _, mode := range []string{"1s", "never"} {
		t.Run("fsync "+mode, func(t *testing.T) { crashRounds(t, mode, rounds) })
	}
}

// crashWriter is one writer's knowledge of what the server acknowledged.
type crashWriter struct {
	counter  int64 // the last value acknowledged or read (value = revision)
	present  map[string]bool
	unknown  map[string]bool // a write of it was cut by the kill
	requests int
}

func crashRounds(t *testing.T, mode string, rounds int) {
	dir := t.TempDir()
	writers := make([]*crashWriter, 8)
	for w := range writers {
		writers[w] = &crashWriter{counter: -1, present: map[string]bool{}, unknown: map[string]bool{}}
	}
	var maxSeq int64 // of the events sent before a kill
	for round := range rounds {
		child := startCrashChild(t, dir, mode)
		url := "http://" + child.addr
		// What was acknowledged is there.
		if seq := streamStart(t, url); seq < maxSeq {
			t.Fatalf("round %d: the change sequence starts at %d; events up to %d were sent before the kill", round, seq, maxSeq)
		}
		for w, cw := range writers {
			r := do(t, "GET", fmt.Sprintf("%s/c/%d", url, w), "")
			v, _ := strconv.ParseInt(r.body, 10, 64)
			rev, _ := strconv.ParseInt(r.header.Get("X-Revision"), 10, 64)
			switch {
			case r.code == 404 && cw.counter >= 0:
				t.Fatalf("round %d: counter %d is missing; %d was acknowledged", round, w, cw.counter)
			case r.code == 200 && (v < cw.counter || v != rev):
				t.Fatalf("round %d: counter %d is %d at revision %d; %d was acknowledged (value = revision)", round, w, v, rev, cw.counter)
			case r.code == 200:
				cw.counter = v
			}
			for key, present := range cw.present {
				if code := do(t, "GET", url+key, "").code; cw.unknown[key] {
					cw.present[key] = code == 200
					delete(cw.unknown, key)
				} else if (code == 200) != present {
					t.Fatalf("round %d: %s answers %d; its acknowledged state is present=%v", round, key, code, present)
				}
			}
		}
		// Load, and a kill at a random moment.
		var seen atomic.Int64
		go watchSeq(url, &seen)
		var wg sync.WaitGroup
		for w, cw := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				crashWrite(url, w, cw)
			}()
		}
		time.Sleep(time.Duration(100+rand.IntN(300)) * time.Millisecond)
		child.cmd.Process.Kill()
		child.cmd.Wait()
		wg.Wait()
		maxSeq = max(maxSeq, seen.Load())
	}
	total := 0
	for _, cw := range writers {
		total += cw.requests
	}
	t.Logf("%d rounds, %d acknowledged writes", rounds, total)
}

// crashWrite writes until the server dies: increments of /c/<w>, and
// writes and deletes of /d/<w>/<i>, noting what was acknowledged.
func crashWrite(url string, w int, cw *crashWriter) {
	c := &http.Client{Transport: &http.Transport{}}
	defer c.CloseIdleConnections()
	send := func(method, path, body string, headers ...string) (int, http.Header, string, bool) {
		req, _ := http.NewRequest(method, url+path, strings.NewReader(body))
		for i := 0; i+1 < len(headers); i += 2 {
			req.Header.Set(headers[i], headers[i+1])
		}
		resp, err := c.Do(req)
		if err != nil {
			return 0, nil, "", false
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, resp.Header, string(b), err == nil
	}
	counter := fmt.Sprintf("/c/%d", w)
	for i := 0; ; i++ {
		code, h, body, ok := send("GET", counter, "")
		if !ok {
			return
		}
		next, rev := int64(0), int64(0)
		if code == 200 {
			v, _ := strconv.ParseInt(body, 10, 64)
			r, _ := strconv.ParseInt(h.Get("X-Revision"), 10, 64)
			next, rev = v+1, r+1
			cw.counter = max(cw.counter, v) // a read shows only what is on disk: it too must stay
		}
		code, _, _, ok = send("PUT", counter, strconv.FormatInt(next, 10), "X-Revision", strconv.FormatInt(rev, 10))
		if !ok {
			return
		}
		if code == 200 {
			cw.counter = next
			cw.requests++
		}
		if i%3 == 0 {
			key := fmt.Sprintf("/d/%d/%d", w, i%5)
			method := "POST"
			if cw.present[key] {
				method = "DELETE"
			}
			cw.unknown[key] = true
			if _, _, _, ok := send(method, key, `"x"`); !ok {
				return
			}
			cw.present[key] = method == "POST"
			delete(cw.unknown, key)
			cw.requests++
		}
	}
}

// streamStart returns where a new live stream starts: the last change
// published.
func streamStart(t *testing.T, url string) int64 {
	resp, err := http.DefaultTransport.RoundTrip(sseRequest(t, url+"/"))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if id, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "id: "); ok {
			return seqOf(id)
		}
	}
}

// watchSeq records the highest change number of the events a stream of
// every key brings, until the server dies.
func watchSeq(url string, seen *atomic.Int64) {
	req, _ := http.NewRequest("GET", url+"/", nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if id, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "id: /"); ok {
			if seq := seqOf(id); seq > seen.Load() {
				seen.Store(seq)
			}
		}
	}
}

// startCrashChild runs the real main in a child process on dir.
func startCrashChild(t *testing.T, dir, mode string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "ATOMKV_CHILD=main", "ATOMKV_DATA="+dir, "ATOMKV_FSYNC="+mode)
	stdout, _ := cmd.StdoutPipe()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: cmd, lines: bufio.NewScanner(stdout)}
	for c.lines.Scan() {
		if _, a, ok := strings.Cut(c.lines.Text(), "msg=listening addr="); ok {
			c.addr = strings.Fields(a)[0]
			break
		}
	}
	if c.addr == "" {
		cmd.Wait()
		t.Fatalf("the server did not start: %s", stderr.String())
	}
	go io.Copy(io.Discard, stdout)
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGKILL); cmd.Wait() })
	return c
}

// BenchmarkDataRestart stores 1,000,000 keys like /k/1234567 = {"v":1}
// with -data and reports how long loading them takes, first from the log
// alone, then from a snapshot; the files' size against the keys' and
// values' bytes; and the heap a loaded key takes. Run it with
// -benchtime=1x.
func BenchmarkDataRestart(b *testing.B) {
	const n = 1_000_000
	dir := b.TempDir()
	s := NewStore(0, nil)
	d, err := loadData(dir, fsyncNever, s, discardLogger())
	if err != nil {
		b.Fatal(err)
	}
	d.minCompact = 1 << 40 // the log alone, first
	d.start()
	var wg sync.WaitGroup
	for w := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 64 {
				s.Set(fmt.Sprintf("/k/%07d", i), `{"v":1}`, 0)
			}
		}()
	}
	wg.Wait()
	live := s.liveBytes.Load()
	d.close()
	restart := func(what string) *Store {
		runtime.GC()
		before := heapInUse()
		s := NewStore(0, nil)
		start := time.Now()
		d, err := loadData(dir, fsyncNever, s, discardLogger())
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(time.Since(start).Milliseconds()), "ms/load-"+what)
		b.ReportMetric(float64(heapInUse()-before)/n, "heap-B/key-"+what)
		size, _ := dirSize(b, dir)
		b.ReportMetric(float64(size)/float64(live), "files/live-"+what)
		if s.Len() != n {
			b.Fatalf("%d keys loaded; want %d", s.Len(), n)
		}
		d.close()
		return s
	}
	for range b.N {
		s := restart("log")
		d, _ := loadData(dir, fsyncNever, s, discardLogger()) // a snapshot as compaction writes it
		d.writeSnapshot(s.seq)
		d.removeBefore(s.seq)
		d.lockf.Close()
		restart("snapshot")
	}
}

// BenchmarkFsync is what one fsync of a small append costs on this
// machine's disk (where the tests' temporary files are).
func BenchmarkFsync(b *testing.B) {
	f, err := os.Create(filepath.Join(b.TempDir(), "f"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	rec := make([]byte, 64)
	for b.Loop() {
		f.Write(rec)
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
	}
}

// TestLoadData compares POST throughput with -data (-fsync 1s and
// always) against the server in memory, at 64 connections, with wrk over
// loopback, rounds alternating in one run: on one key, where every write
// waits behind the one before, and spread over 64 keys.
func TestLoadData(t *testing.T) {
	needLoad(t)
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		t.Skip("wrk is not installed (apt-get install -y wrk)")
	}
	modes := []string{"memory", "never", "1s", "always"}
	urls := map[string]string{
		"memory": startServer(t),
		"never":  startServer(t, "-data", t.TempDir(), "-fsync", "never"),
		"1s":     startServer(t, "-data", t.TempDir()),
		"always": startServer(t, "-data", t.TempDir(), "-fsync", "always"),
	}
	scripts := map[string]string{
		"one key": `wrk.method = "POST"; wrk.body = '{"v":1}'; wrk.headers["Content-Type"] = "application/json"`,
		"64 keys": `n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/k/" .. (n % 64), {["Content-Type"] = "application/json"}, '{"v":1}')
end`,
	}
	rps := regexp.MustCompile(`Requests/sec:\s+([0-9.]+)`)
	for _, name := range []string{"one key", "64 keys"} {
		script := filepath.Join(t.TempDir(), "post.lua")
		os.WriteFile(script, []byte(scripts[name]), 0o644)
		got := map[string][]float64{}
		for round := range 5 {
			for _, mode := range modes {
				out, err := exec.Command(wrk, "-t1", "-c64", "-d2s", "-s", script, urls[mode]+"/k/1").CombinedOutput()
				m := rps.FindSubmatch(out)
				if err != nil || m == nil {
					t.Fatalf("wrk: %v\n%s", err, out)
				}
				f, _ := strconv.ParseFloat(string(m[1]), 64)
				got[mode] = append(got[mode], f)
				t.Logf("%s, round %d, %s: %.0f req/s", name, round, mode, f)
			}
		}
		fmt.Printf("POST, %s: memory %.0f req/s; -data with -fsync never %.0f (%.2f×), 1s %.0f (%.2f×), always %.0f (%.2f×) (medians of 5 rounds)\n", name,
			median(got["memory"]), median(got["never"]), median(got["never"])/median(got["memory"]),
			median(got["1s"]), median(got["1s"])/median(got["memory"]),
			median(got["always"]), median(got["always"])/median(got["memory"]))
	}
}

// TestDataFailStop: in every -fsync mode, when the n-th write or fsync of
// the data files fails (injected through the file-system seam), the data
// files are broken for good: the server is told to stop, no change is
// published (so none acknowledged) after the failure, every later write
// gets errNotWritten, close reports the failure, and the directory as
// the failure left it starts with every write acknowledged before.
func TestDataFailStop(t *testing.T) {
	for _, mode := range []fsyncMode{fsyncAlways, fsyncSecond, fsyncNever} {
		for _, kind := range []opKind{opWrite, opSync} {
			for _, n := range []int{1, 4} {
				name := fmt.Sprintf("-fsync %s, fsync %d fails", mode.String(), n)
				if kind == opWrite {
					name = fmt.Sprintf("-fsync %s, write %d fails", mode.String(), n)
				}
				t.Run(name, func(t *testing.T) { failStop(t, mode, kind, n) })
			}
		}
	}
}

func failStop(t *testing.T, mode fsyncMode, kind opKind, n int) {
	m := newMemFS()
	s := NewStore(0, nil)
	d, err := loadDataFS(m, crashDir, mode, s, discardLogger())
	if err != nil {
		t.Fatal(err)
	}
	d.minCompact = 1 << 8 // rotations and snapshots, whose fsyncs fail too
	d.syncEvery = time.Millisecond
	failedAt := -1 // the index in m.ops of the failure
	seen, ofLog := 0, false
	m.fault = func(op fsOp) error { // with m.mu held
		if op.kind == kind && failedAt < 0 {
			if seen++; seen == n {
				failedAt = len(m.ops)
				for p, ino := range m.names {
					ofLog = ofLog || ino == op.ino && strings.Contains(p, "/log-")
				}
				return errInjected
			}
		}
		return nil
	}
	s.publish = func(c change) { m.ack(c.seq) } // published, as opAck, in the same order as the operations
	d.start()
	var wg sync.WaitGroup
	acked := make([]int, 4) // of each writer, the last value acknowledged
	for w := range acked {
		acked[w] = -1
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				_, err := s.Set(fmt.Sprintf("/w/%d", w), strconv.Itoa(i), 0)
				if err != nil {
					if err != errNotWritten {
						t.Errorf("a write once the data files broke: %v; want errNotWritten", err)
					}
					return
				}
				acked[w] = i
			}
		}()
	}
	select {
	case <-d.failed:
	case <-time.After(20 * time.Second): // a hang breaker, not a timing
		t.Fatal("the server was not told to stop")
	}
	wg.Wait()
	if _, err := s.Set("/later", "1", 0); err != errNotWritten {
		t.Errorf("a write after the failure: %v; want errNotWritten", err)
	}
	if err := d.close(); err == nil || !errors.Is(err, errInjected) {
		t.Errorf("close: %v; want the injected error", err)
	}
	m.mu.Lock()
	ops := slices.Clone(m.ops)
	kill := image{}
	for p, ino := range m.names {
		kill[p] = m.inos[ino]
	}
	m.mu.Unlock()
	if failedAt < 0 {
		t.Fatalf("no %v failed", kind)
	}
	// After a failed write or fsync of the log, nothing is published. (A
	// snapshot's failure, in the background, breaks the data files as
	// well, but the log's records, which the flusher may settle
	// meanwhile, are not in doubt.)
	for _, op := range ops[failedAt:] {
		if op.kind == opAck && ofLog {
			t.Fatalf("change %d published after the failure", op.seq)
		}
	}
	// What the failure left starts, with every acknowledged write.
	s2 := NewStore(0, nil)
	d2, err := loadDataFS(memFSOf(kill), crashDir, mode, s2, discardLogger())
	if err != nil {
		t.Fatalf("the directory the failure left does not start: %v", err)
	}
	defer d2.close()
	for w, i := range acked {
		got := -1
		if e := s2.Get(fmt.Sprintf("/w/%d", w)); e != nil {
			got, _ = strconv.Atoi(e.value)
		}
		if got < i {
			t.Errorf("writer %d: %d acknowledged, %d after a restart", w, i, got)
		}
	}
}

// faultFS is the real file system, but for the n-th write or fsync of a
// data file, which fails: what ATOMKV_FAULT=write:N or fsync:N sets up in
// a child process (see init).
type faultFS struct {
	osFS
	kind  string
	n     int64
	count atomic.Int64
}

func (f *faultFS) create(path string) (dataFile, error) {
	file, err := f.osFS.create(path)
	return &faultFile{file, f}, err
}

func (f *faultFS) openAppend(path string) (dataFile, error) {
	file, err := f.osFS.openAppend(path)
	return &faultFile{file, f}, err
}

// fails counts an operation of kind and reports whether it is the one to
// fail.
func (f *faultFS) fails(kind string) bool {
	return kind == f.kind && f.count.Add(1) == f.n
}

type faultFile struct {
	dataFile
	fs *faultFS
}

func (f *faultFile) Write(p []byte) (int, error) {
	if f.fs.fails("write") {
		return 0, errInjected
	}
	return f.dataFile.Write(p)
}

func (f *faultFile) Sync() error {
	if f.fs.fails("fsync") {
		return errInjected
	}
	return f.dataFile.Sync()
}

func init() {
	if spec := os.Getenv("ATOMKV_FAULT"); spec != "" {
		kind, n, _ := strings.Cut(spec, ":")
		count, _ := strconv.ParseInt(n, 10, 64)
		dataFS = &faultFS{kind: kind, n: count}
	}
}

// TestDataFailStopExit: the real server, in a child process whose n-th
// fsync (or write) of a data file fails, stops by itself with a non-zero
// exit and the error in its log; started again on the directory, it
// holds every write it acknowledged. With -fsync never, the third fsync
// is the last one, at shutdown (after the first snapshot's and log's):
// a SIGTERM then exits non-zero too.
func TestDataFailStopExit(t *testing.T) {
	for _, tt := range []struct {
		mode, fault string
		term        bool // stop it with SIGTERM after a few writes
	}{
		{"always", "fsync:6", false},
		{"1s", "write:6", false},
		{"never", "fsync:3", true},
	} {
		t.Run(tt.mode+" "+tt.fault, func(t *testing.T) {
			dir := t.TempDir()
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "ATOMKV_CHILD=main", "ATOMKV_DATA="+dir, "ATOMKV_FSYNC="+tt.mode, "ATOMKV_FAULT="+tt.fault)
			var buf bytes.Buffer
			out := &lockedWriter{w: &buf} // the child's log, read while it is written
			logged := func() string {
				out.mu.Lock()
				defer out.mu.Unlock()
				return buf.String()
			}
			cmd.Stdout, cmd.Stderr = out, out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			t.Cleanup(func() { cmd.Process.Kill(); <-exited })
			var addr string
			waitFor(t, "the child to listen", func() bool {
				_, a, ok := strings.Cut(logged(), "msg=listening addr=")
				if ok {
					addr = strings.Fields(a)[0]
				}
				return ok
			})
			var acked []int
			for i := 0; ; i++ {
				if tt.term && i == 5 {
					cmd.Process.Signal(syscall.SIGTERM)
				}
				resp, err := http.Post(fmt.Sprintf("http://%s/f/%d", addr, i), "application/json", strings.NewReader("1"))
				if err != nil {
					break
				}
				resp.Body.Close()
				if resp.StatusCode == 200 {
					acked = append(acked, i)
				}
			}
			err := <-exited
			exited <- err // for the cleanup
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() == 0 {
				t.Fatalf("the server ended with %v; want a non-zero exit", err)
			}
			if log := logged(); !strings.Contains(log, "data files: the server stops") || !strings.Contains(log, errInjected.Error()) {
				t.Errorf("log %q; want the failure", log)
			}
			url := startServer(t, "-data", dir)
			for _, i := range acked {
				if r := do(t, "GET", fmt.Sprintf("%s/f/%d", url, i), ""); r.code != 200 {
					t.Errorf("/f/%d, acknowledged before the failure: %d after a restart", i, r.code)
				}
			}
			t.Logf("%d writes acknowledged before the failure; exit %v", len(acked), err)
		})
	}
}
