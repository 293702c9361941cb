package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestParseTTL(t *testing.T) {
	const day = 24 * time.Hour
	good := []struct {
		in   string
		want time.Duration
	}{
		{"1500", 1500 * time.Millisecond},
		{"1", time.Millisecond},
		{" 250 ", 250 * time.Millisecond},
		{"500ms", 500 * time.Millisecond},
		{"5 msec", 5 * time.Millisecond},
		{"5msecs", 5 * time.Millisecond},
		{"1 millisecond", time.Millisecond},
		{"2 milliseconds", 2 * time.Millisecond},
		{"90 sec", 90 * time.Second},
		{"1s", time.Second},
		{"2 secs", 2 * time.Second},
		{"1 second", time.Second},
		{"3 seconds", 3 * time.Second},
		{"1m", time.Minute},
		{"2 min", 2 * time.Minute},
		{"3mins", 3 * time.Minute},
		{"1 minute", time.Minute},
		{"4 minutes", 4 * time.Minute},
		{"2.5h", 150 * time.Minute},
		{"1 hr", time.Hour},
		{"2hrs", 2 * time.Hour},
		{"1 hour", time.Hour},
		{"10 hours 1m 5s", 10*time.Hour + time.Minute + 5*time.Second},
		{"1h30m", 90 * time.Minute},
		{"1H30M", 90 * time.Minute},
		{"1d", day},
		{"1 day", day},
		{"3 Days", 3 * day},
		{"1w", 7 * day},
		{"1 week", 7 * day},
		{"2 weeks", 14 * day},
		{"1y", 36525 * day / 100},
		{"1 yr", 36525 * day / 100},
		{"2yrs", 2 * 36525 * day / 100},
		{"1 year", 36525 * day / 100},
		{"100 years", maxTTL},
		{"100y", maxTTL},
		{".5s", 500 * time.Millisecond},
		{"1.5 ms", 1500 * time.Microsecond},
		{"1d 1d", 2 * day},
	}
	for _, tt := range good {
		got, err := parseTTL(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("parseTTL(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
		}
	}
	bad := []struct{ in, msg string }{
		{"", "empty"},
		{"   ", "empty"},
		{"0", "must be positive"},
		{"0s", "must be positive"},
		{"0.0000001ms", "must be positive"},
		{"-5s", "must be positive"},
		{"-1", "must be positive"},
		{"1e3", `unknown unit "e"`},
		{"1 h 30", "has no unit"},
		{"5 parsecs", `unknown unit "parsecs"`},
		{"101y", "longer than 100 years"},
		{"100y 1ms", "longer than 100 years"},
		{"99999999999999999999999", "longer than 100 years"},
		{"9999999999999999999999999999h", "longer than 100 years"},
		{strings.Repeat("9", 400), "longer than 100 years"},
		{strings.Repeat("9", 400) + "ms", "longer than 100 years"},
		{"h", "has no number"},
		{"1..5s", "is not a number"},
		{"1s,2s", `unexpected ","`},
		{"5 s!", `unexpected "!"`},
		{"1 m s", "has no number"},
		{"10 hours and 5s", `unit "and" has no number`},
	}
	for _, tt := range bad {
		_, err := parseTTL(tt.in)
		if err == nil || !strings.Contains(err.Error(), tt.msg) || !strings.Contains(err.Error(), fmt.Sprintf("%q", tt.in)) {
			t.Errorf("parseTTL(%q): got error %v; want one quoting the input and saying %q", tt.in, err, tt.msg)
		}
	}
}

func TestTTLFromJSON(t *testing.T) {
	for in, want := range map[string]time.Duration{`1500`: 1500 * time.Millisecond, `"2s"`: 2 * time.Second, `1e3`: time.Second, `"100"`: 100 * time.Millisecond} {
		if got, err := ttlFromJSON([]byte(in)); err != nil || got != want {
			t.Errorf("ttlFromJSON(%s) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{`0`, `-1`, `"x"`, `true`, `null`, `{}`, `"`, `1e30`} {
		if _, err := ttlFromJSON([]byte(in)); err == nil || !strings.Contains(err.Error(), "invalid TTL") {
			t.Errorf("ttlFromJSON(%s): got %v; want an invalid TTL error", in, err)
		}
	}
}

func FuzzParseTTL(f *testing.F) {
	for _, s := range []string{"1500", "10 hours 1m 5s", "2.5h", "1h30m", "5 parsecs", "-5s", "1e3", "100y", ".5s", "1..5s"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := parseTTL(s)
		if err == nil && (d <= 0 || d > maxTTL) {
			t.Errorf("parseTTL(%q) = %v: accepted, but not in (0, 100 years]", s, d)
		}
		if err != nil && !strings.Contains(err.Error(), fmt.Sprintf("%q", s)) {
			t.Errorf("parseTTL(%q): error %q does not quote the input", s, err)
		}
	})
}

// fakeClock is a clock whose time moves only when a test says so.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c      *fakeClock
	at     time.Time
	f      func()
	active bool
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, at: c.now.Add(d), f: f, active: true}
	c.timers = append(c.timers, t)
	return t
}

func (t *fakeTimer) Reset(d time.Duration) bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.active
	t.at, t.active = t.c.now.Add(d), true
	return was
}

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.active
	t.active = false
	return was
}

// Advance moves the clock on and runs the timers that came due, in this
// goroutine, before it returns.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	var due []func()
	for _, t := range c.timers {
		if t.active && !t.at.After(c.now) {
			t.active = false
			due = append(due, t.f)
		}
	}
	c.mu.Unlock()
	for _, f := range due {
		f()
	}
}

// Skip moves the clock on without running any timer, as when a timer is
// late.
func (c *fakeClock) Skip(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// published records what a store publishes.
type published struct {
	mu     sync.Mutex
	events []string // "key rev reason"
}

func (p *published) hook(c change) {
	p.mu.Lock()
	defer p.mu.Unlock()
	rev := int64(noRevision)
	if c.e != nil {
		rev = c.e.revision
	}
	p.events = append(p.events, fmt.Sprintf("%s %d %s", c.key, rev, c.why))
}

func (p *published) list() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.events)
}

func (p *published) count(event string) int {
	n := 0
	for _, e := range p.list() {
		if e == event {
			n++
		}
	}
	return n
}

func newFakeStore() (*Store, *fakeClock, *published) {
	c := newFakeClock()
	s := NewStore(0, c)
	p := &published{}
	s.publish = p.hook
	return s, c, p
}

func TestExpiryWithFakeClock(t *testing.T) {
	s, c, p := newFakeStore()
	s.Set("/k", "1", 10*time.Second)
	s.Set("/forever", "2", 0)
	if ms, ok := s.Get("/k").ttlLeft(s.now()); !ok || ms != 10000 {
		t.Errorf("ttlLeft: got %d, %v; want 10000", ms, ok)
	}
	c.Advance(9 * time.Second)
	if s.Get("/k") == nil {
		t.Fatal("expired a second early")
	}
	// The deadline passes but the timer has not run: reads must not see
	// the key all the same.
	c.Skip(time.Second)
	if e := s.Get("/k"); e != nil {
		t.Errorf("Get after the deadline, before the timer: got %v; want nil", e)
	}
	if items := s.List("/"); len(items) != 1 || items[0].key != "/forever" {
		t.Errorf("List after the deadline: got %v; want only /forever", items)
	}
	if n := p.count("/k -1 expired"); n != 0 {
		t.Errorf("expired published before the timer ran: %d", n)
	}
	c.Advance(0)
	if n := p.count("/k -1 expired"); n != 1 {
		t.Errorf("expired published %d times; want once (events %v)", n, p.list())
	}
	if s.expiry.Len() != 0 || s.Len() != 1 {
		t.Errorf("after expiry: %d deadlines, %d keys; want 0 and 1", s.expiry.Len(), s.Len())
	}
	if _, ok := s.keys.Load("/k"); ok {
		t.Error("the expired key's slot is still in the map")
	}
	c.Advance(time.Hour)
	if n := p.count("/k -1 expired"); n != 1 {
		t.Errorf("expired published %d times; want once", n)
	}
}

// TestWriteRacesTimer: a write that lands just before the old deadline
// keeps the key, both when it removes the old deadline in time and when
// the timer has already taken the old deadline off the heap.
func TestWriteRacesTimer(t *testing.T) {
	s, c, p := newFakeStore()
	s.Set("/k", "1", 10*time.Second)
	c.Advance(10*time.Second - time.Millisecond)
	s.Set("/k", "2", 10*time.Second)
	c.Advance(time.Millisecond) // the old deadline
	if e := s.Get("/k"); e == nil || e.value != "2" {
		t.Fatalf("after the old deadline: got %v; want the new value", e)
	}
	// The timer took the deadline off the heap, then a write came before
	// it could lock the key: expiring that stale deadline must do nothing.
	stale := s.Get("/k").ttl
	s.Set("/k", "3", 10*time.Second)
	s.journal.expire(stale)
	if e := s.Get("/k"); e == nil || e.value != "3" {
		t.Fatalf("a stale deadline deleted a fresh value: got %v", e)
	}
	if n := p.count("/k -1 expired"); n != 0 {
		t.Errorf("expired published %d times; want 0", n)
	}
	c.Advance(10 * time.Second)
	if s.Get("/k") != nil || p.count("/k -1 expired") != 1 {
		t.Errorf("the new deadline did not expire the key once: %v", p.list())
	}
}

// TestWriteAfterUnfiredDeadline: a write to a key whose deadline passed
// but whose timer has not run starts the key again at revision 0, and
// subscribers see the expiry first.
func TestWriteAfterUnfiredDeadline(t *testing.T) {
	s, c, p := newFakeStore()
	s.Set("/k", "1", time.Second)
	s.Set("/k", "2", time.Second)
	c.Skip(2 * time.Second)
	e, _ := s.Set("/k", "3", 0)
	if e.revision != 0 {
		t.Errorf("revision after expiry: got %d; want 0", e.revision)
	}
	want := []string{"/k 0 changed", "/k 1 changed", "/k -1 expired", "/k 0 changed"}
	if got := p.list(); !slices.Equal(got, want) {
		t.Errorf("published %v; want %v", got, want)
	}
	c.Advance(0)
	if s.Get("/k") == nil || s.expiry.Len() != 0 {
		t.Error("the permanent rewrite was expired, or a deadline leaked")
	}
}

func TestWritesStopDeadlines(t *testing.T) {
	s, _, _ := newFakeStore()
	s.Set("/k", "1", time.Hour)
	if _, err := s.CompareAndSwap("/k", "2", 1, 0); err != nil {
		t.Fatal(err)
	}
	if n := s.expiry.Len(); n != 0 {
		t.Errorf("after a CAS without TTL: %d deadlines; want 0", n)
	}
	s.CompareAndSwap("/k", "3", 2, time.Hour)
	s.CompareAndSwap("/k", "4", 3, 2*time.Hour)
	if n := s.expiry.Len(); n != 1 {
		t.Errorf("after two CAS with TTL: %d deadlines; want 1", n)
	}
	s.Delete("/k", -1)
	if n := s.expiry.Len(); n != 0 {
		t.Errorf("after Delete: %d deadlines; want 0", n)
	}
	s.Set("/k", "1", time.Hour)
	s.Set("/k", "1", 0)
	if n := s.expiry.Len(); n != 0 {
		t.Errorf("after a Set without TTL: %d deadlines; want 0", n)
	}
}

func TestDefaultTTL(t *testing.T) {
	s, c, _ := newFakeStore()
	s.defaultTTL = time.Minute
	s.Set("/d", "1", 0)
	s.Set("/own", "1", time.Hour)
	c.Advance(time.Minute)
	if s.Get("/d") != nil || s.Get("/own") == nil {
		t.Error("the default TTL did not apply to the key without one only")
	}
}

// TestRealExpiry uses the real clock: a 50 ms key is awaited through the
// publish hook, not slept on.
func TestRealExpiry(t *testing.T) {
	s := NewStore(0, nil)
	expiredCh := make(chan string, 10)
	s.publish = func(c change) {
		if c.why == expired {
			expiredCh <- c.key
		}
	}
	s.Set("/short", "1", 50*time.Millisecond)
	select {
	case key := <-expiredCh:
		if key != "/short" {
			t.Errorf("expired %q; want /short", key)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the key never expired")
	}
	if s.Get("/short") != nil || s.expiry.Len() != 0 || len(expiredCh) != 0 {
		t.Errorf("after expiry: Get %v, %d deadlines, %d more expiries", s.Get("/short"), s.expiry.Len(), len(expiredCh))
	}
}

// TestManyExpiries: 10,000 keys with random TTLs all expire, each once,
// and no deadline is left behind.
func TestManyExpiries(t *testing.T) {
	const n = 10000
	s := NewStore(0, nil)
	var count atomic.Int64
	all := make(chan struct{})
	s.publish = func(c change) {
		if c.why == expired && count.Add(1) == n {
			close(all)
		}
	}
	for i := range n {
		s.Set(fmt.Sprintf("/k/%d", i), "1", time.Duration(1+rand.IntN(200))*time.Millisecond)
	}
	select {
	case <-all:
	case <-time.After(30 * time.Second):
		t.Fatalf("only %d of %d keys expired", count.Load(), n)
	}
	if s.Len() != 0 || s.expiry.Len() != 0 {
		t.Errorf("after expiry: %d keys, %d deadlines; want 0 and 0", s.Len(), s.expiry.Len())
	}
}

func TestHTTPTTL(t *testing.T) {
	url := startServer(t)
	ttlOf := func(path string) string {
		t.Helper()
		return do(t, "GET", url+path, "").header.Get("X-TTL")
	}
	do(t, "POST", url+"/h", `1`, "X-TTL", "1h")
	if got := ttlOf("/h"); got == "" || got > "3600000" || len(got) != 7 {
		t.Errorf("X-TTL after a 1h TTL: got %q; want about 3600000", got)
	}
	do(t, "POST", url+"/q?ttl=2m", `1`)
	if got := ttlOf("/q"); len(got) != 6 || got > "120000" {
		t.Errorf("X-TTL after ?ttl=2m: got %q; want about 120000", got)
	}
	do(t, "POST", url+"/both?ttl=1h", `1`, "X-TTL", "90s")
	if got := ttlOf("/both"); len(got) != 5 || got > "90000" {
		t.Errorf("X-TTL given both ways: got %q; want the header's, about 90000", got)
	}
	do(t, "PUT", url+"/h", `2`, "X-Revision", "1")
	if got := ttlOf("/h"); got != "" {
		t.Errorf("X-TTL after a write without TTL: got %q; want none (permanent)", got)
	}
	do(t, "PUT", url+"/h", `3`, "X-Revision", "2", "X-TTL", "1 day")
	list := do(t, "GET", url+"/", "", "Accept", "application/json").body
	var items []struct {
		Key           string
		Value         json.RawMessage
		Revision, TTL int64
	}
	json.Unmarshal([]byte(list), &items)
	found := false
	for _, it := range items {
		// A day in ms, less what the test took since (never a full minute).
		found = found || it.Key == "/h" && string(it.Value) == "3" && it.Revision == 2 && it.TTL <= 86_400_000 && it.TTL > 86_340_000
	}
	if !found {
		t.Errorf("listing: got %s; want /h with its ttl", list)
	}
	for _, bad := range []struct{ path, ttl, msg string }{
		{"/b", "5 parsecs", `invalid TTL "5 parsecs": unknown unit "parsecs"`},
		{"/b", "0", `invalid TTL "0": must be positive`},
		{"/b", "-5s", `invalid TTL "-5s": must be positive`},
		{"/b", "200y", `invalid TTL "200y": longer than 100 years`},
	} {
		resp := do(t, "POST", url+bad.path, `1`, "X-TTL", bad.ttl)
		if resp.code != 400 || errorMessage(resp) != bad.msg {
			t.Errorf("X-TTL %q: got %d %s; want 400 %q", bad.ttl, resp.code, resp.body, bad.msg)
		}
	}
	if resp := do(t, "POST", url+"/b?ttl=soon", `1`); resp.code != 400 {
		t.Errorf("?ttl=soon: got %d; want 400", resp.code)
	}
	if resp := do(t, "GET", url+"/b", ""); resp.code != 404 {
		t.Errorf("a write with a bad TTL stored something: %d %s", resp.code, resp.body)
	}
	// A real short TTL, end to end: poll until the key is gone.
	do(t, "POST", url+"/short?ttl=50ms", `1`)
	for do(t, "GET", url+"/short", "").code == 200 {
		time.Sleep(5 * time.Millisecond)
	}
	if resp := do(t, "GET", url+"/short", ""); resp.code != 404 {
		t.Errorf("expired key: got %d; want 404", resp.code)
	}
}

func TestDefaultTTLFlag(t *testing.T) {
	url := startServer(t, "-default-ttl", "1h")
	do(t, "POST", url+"/k", `1`)
	if got := do(t, "GET", url+"/k", "").header.Get("X-TTL"); len(got) != 7 {
		t.Errorf("X-TTL with -default-ttl 1h: got %q; want about 3600000", got)
	}
	if _, err := parseConfig([]string{"-default-ttl", "soon"}, func(string) string { return "" }, io.Discard); err == nil {
		t.Error("-default-ttl soon: no error")
	}
}

// BenchmarkExpiryLateness sets 100,000 keys to expire within one second
// and reports how late their expiry came: p50 and p99 of (time removed −
// deadline). Run it with -benchtime=1x.
func BenchmarkExpiryLateness(b *testing.B) {
	const n = 100_000
	for range b.N {
		s := NewStore(0, nil)
		type removal struct {
			key string
			at  int64
		}
		removed := make([]removal, n) // filled lock-free: the hook must not slow expiry down
		var count atomic.Int64
		done := make(chan struct{})
		s.publish = func(c change) {
			if c.why != expired {
				return
			}
			now := time.Now().UnixNano()
			i := count.Add(1)
			removed[i-1] = removal{c.key, now}
			if i == n {
				close(done)
			}
		}
		deadlines := make(map[string]int64, n)
		for i := range n {
			key := fmt.Sprintf("/k/%d", i)
			e, _ := s.Set(key, "1", time.Duration(1+rand.IntN(1000))*time.Millisecond)
			deadlines[key] = e.ttl.at
		}
		<-done
		late := make([]time.Duration, n)
		for i, r := range removed {
			late[i] = time.Duration(r.at - deadlines[r.key])
		}
		slices.Sort(late)
		b.ReportMetric(float64(late[n/2].Microseconds()), "p50-late-µs")
		b.ReportMetric(float64(late[n*99/100].Microseconds()), "p99-late-µs")
	}
}
