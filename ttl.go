package main

import (
	"container/heap"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxTTL is the longest TTL accepted: 100 years of 365.25 days.
const maxTTL = 36525 * 24 * time.Hour

// ttlUnits maps every accepted unit spelling to its length.
var ttlUnits = map[string]time.Duration{}

func init() {
	for d, names := range map[time.Duration][]string{
		time.Millisecond:   {"ms", "msec", "msecs", "millisecond", "milliseconds"},
		time.Second:        {"s", "sec", "secs", "second", "seconds"},
		time.Minute:        {"m", "min", "mins", "minute", "minutes"},
		time.Hour:          {"h", "hr", "hrs", "hour", "hours"},
		24 * time.Hour:     {"d", "day", "days"},
		7 * 24 * time.Hour: {"w", "week", "weeks"},
		maxTTL / 100:       {"y", "yr", "yrs", "year", "years"},
	} {
		for _, n := range names {
			ttlUnits[n] = d
		}
	}
}

// parseTTL parses a TTL as SPEC section 2 gives it: a string of digits is
// milliseconds; otherwise one or more <number><unit> parts, spaces
// optional, case-insensitive ("10 hours 1m 5s", "2.5h", "1h30m"). The
// result is positive and at most 100 years.
func parseTTL(s string) (time.Duration, error) {
	bad := func(why string) error { return fmt.Errorf("invalid TTL %q: %s", s, why) }
	rest := strings.TrimSpace(s)
	if rest == "" {
		return 0, bad("empty")
	}
	if strings.HasPrefix(rest, "-") {
		return 0, bad("must be positive")
	}
	if isDigits(rest) {
		// Only ErrRange can happen: +Inf, which ttlFromMillis calls too long.
		ms, _ := strconv.ParseFloat(rest, 64)
		return ttlFromMillis(ms, bad)
	}
	var total float64 // milliseconds, in float so that "2.5h" is exact and overflow is seen
	for rest != "" {
		i := 0
		for i < len(rest) && (rest[i] >= '0' && rest[i] <= '9' || rest[i] == '.') {
			i++
		}
		num := rest[:i]
		rest = strings.TrimLeft(rest[i:], " ")
		j := 0
		for j < len(rest) && (rest[j]|0x20 >= 'a' && rest[j]|0x20 <= 'z') {
			j++
		}
		unit := strings.ToLower(rest[:j])
		rest = strings.TrimLeft(rest[j:], " ")
		n, err := strconv.ParseFloat(num, 64)
		if errors.Is(err, strconv.ErrRange) {
			err = nil // +Inf: too long, which the total says
		}
		switch {
		case num == "" && unit == "":
			return 0, bad(fmt.Sprintf("unexpected %q", rest[:1]))
		case num == "":
			return 0, bad(fmt.Sprintf("unit %q has no number before it", unit))
		case err != nil:
			return 0, bad(fmt.Sprintf("%q is not a number", num))
		case unit == "":
			return 0, bad(fmt.Sprintf("number %s has no unit (use ms, s, m, h, d, w or y)", num))
		}
		d, ok := ttlUnits[unit]
		if !ok {
			return 0, bad(fmt.Sprintf("unknown unit %q", unit))
		}
		total += n * float64(d) / float64(time.Millisecond)
	}
	return ttlFromMillis(total, bad)
}

func isDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// ttlFromMillis checks a TTL in milliseconds and converts it.
func ttlFromMillis(ms float64, bad func(string) error) (time.Duration, error) {
	switch {
	case math.IsNaN(ms) || ms <= 0:
		return 0, bad("must be positive")
	case ms > float64(maxTTL/time.Millisecond):
		return 0, bad("longer than 100 years")
	}
	d := time.Duration(ms * float64(time.Millisecond))
	if d <= 0 {
		return 0, bad("must be positive") // below a nanosecond
	}
	return d, nil
}

// ttlFromJSON parses a TTL given as a JSON value: a number of
// milliseconds or a string for parseTTL.
func ttlFromJSON(raw json.RawMessage) (time.Duration, error) {
	if len(raw) > 0 && raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return 0, fmt.Errorf("invalid TTL %s: %v", raw, err)
		}
		return parseTTL(s)
	}
	ms, err := strconv.ParseFloat(string(raw), 64)
	if err != nil {
		return 0, fmt.Errorf("invalid TTL %s: want milliseconds or a string like \"10m\"", raw)
	}
	return ttlFromMillis(ms, func(why string) error { return fmt.Errorf("invalid TTL %s: %s", raw, why) })
}

// clock is the time source of expiry; tests inject a fake one.
type clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) timer
}

type timer interface {
	Reset(d time.Duration) bool
	Stop() bool
}

type realClock struct{}

func (realClock) Now() time.Time                            { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) timer { return time.AfterFunc(d, f) }

// deadline is when one version of a key expires. A version with a TTL
// points to its own deadline, so the scheduler can tell a stale deadline
// (the key was written since) from a live one by identity.
type deadline struct {
	at    int64 // Unix nanoseconds; never changes
	key   string
	index int   // position in the heap, -1 when not in it; guarded by expiry.mu
	seq   int64 // in a node's view (-etcd): the version's revision, which its expiry compares
}

// expiry schedules the deadlines of every key with a TTL. It keeps them in
// a min-heap and one time.AfterFunc timer armed for the earliest, which
// costs about 45 bytes per key where a timer per key would cost 150.
type expiry struct {
	clock  clock
	expire func(*deadline) // called, without mu, for each deadline that passed

	mu      sync.Mutex
	pending deadlineHeap
	timer   timer // nil until the first deadline
	armedAt int64 // when timer fires; 0 if stopped
	stopped bool  // by stop: no more expiries
	held    bool  // by hold: deadlines are kept, none fires until resume
}

// hold keeps every deadline from firing until resume: while the store is
// being loaded, an expiry would take a change number in the middle of
// the replay.
func (x *expiry) hold() {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.held = true
	if x.timer != nil {
		x.timer.Stop()
		x.armedAt = 0
	}
}

// resume undoes hold: what is due fires now.
func (x *expiry) resume() {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.held = false
	x.arm()
}

// stop ends expiring, for shutdown: keys keep their deadlines, and with
// -data they count on from there after a restart.
func (x *expiry) stop() {
	x.mu.Lock()
	defer x.mu.Unlock()
	x.stopped = true
	if x.timer != nil {
		x.timer.Stop()
	}
}

// add schedules d.
func (x *expiry) add(d *deadline) {
	x.mu.Lock()
	defer x.mu.Unlock()
	heap.Push(&x.pending, d)
	x.arm()
}

// remove unschedules d if it is scheduled. The timer stays armed for the
// old earliest deadline at worst, and fires once for nothing.
func (x *expiry) remove(d *deadline) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if d.index >= 0 {
		heap.Remove(&x.pending, d.index)
	}
}

// Len returns the number of scheduled deadlines.
func (x *expiry) Len() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return len(x.pending)
}

// arm makes the timer fire at the earliest deadline. x.mu must be held.
func (x *expiry) arm() {
	if len(x.pending) == 0 || x.stopped || x.held {
		return
	}
	at := x.pending[0].at
	if x.armedAt != 0 && x.armedAt <= at {
		return
	}
	x.armedAt = at
	wait := time.Duration(at - x.clock.Now().UnixNano())
	if x.timer == nil {
		x.timer = x.clock.AfterFunc(wait, x.run)
	} else {
		x.timer.Reset(wait)
	}
}

// run takes every deadline that has passed off the heap, re-arms the timer
// for the next, and expires them. It expires with x.mu released, because
// expiring locks the key and writers lock the key before x.mu.
func (x *expiry) run() {
	x.mu.Lock()
	if x.stopped || x.held {
		x.mu.Unlock()
		return
	}
	now := x.clock.Now().UnixNano()
	var due []*deadline
	for len(x.pending) > 0 && x.pending[0].at <= now {
		due = append(due, heap.Pop(&x.pending).(*deadline))
	}
	x.armedAt = 0
	x.arm()
	x.mu.Unlock()
	for _, d := range due {
		x.expire(d)
	}
}

// deadlineHeap is a container/heap of deadlines, earliest first.
type deadlineHeap []*deadline

func (h deadlineHeap) Len() int           { return len(h) }
func (h deadlineHeap) Less(i, j int) bool { return h[i].at < h[j].at }
func (h deadlineHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index = i
	h[j].index = j
}
func (h *deadlineHeap) Push(x any) {
	d := x.(*deadline)
	d.index = len(*h)
	*h = append(*h, d)
}
func (h *deadlineHeap) Pop() any {
	old := *h
	d := old[len(old)-1]
	old[len(old)-1] = nil
	d.index = -1
	*h = old[:len(old)-1]
	if cap(*h) > 1024 && len(*h) < cap(*h)/4 {
		*h = append(deadlineHeap(nil), *h...) // give back what a wave of expiries left
	}
	return d
}

// ttlLeft returns how long e has left to live, in milliseconds rounded up,
// and false if it is permanent.
func (e *entry) ttlLeft(now int64) (int64, bool) {
	if e.ttl == nil {
		return 0, false
	}
	return (e.ttl.at - now + int64(time.Millisecond) - 1) / int64(time.Millisecond), true
}
