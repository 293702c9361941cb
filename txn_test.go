package main

// Transactions (SPEC 11): every answer of POST / and of the WebSocket's
// txn, each refused one leaving the store as it was; access (-tokens);
// -max-keys; and a transaction's events on a stream: one seq, back to
// back, a resume point only after its last.

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// txnFlags are the limits the answer tests run under, small enough to
// cross in a test.
var txnFlags = []string{"-max-txn-ops", "4", "-max-value-bytes", "64", "-max-txn-bytes", "1024", "-max-keys", "4"}

// seedTxn writes the state every answer test starts from: txnSeed.
func seedTxn(t *testing.T, url string) {
	t.Helper()
	for _, w := range [][2]string{{"/t/a", `1`}, {"/t/b", `"w"`}, {"/t/b", `"x"`}, {"/t/d", `[1,2]`}} {
		if r := do(t, "POST", url+w[0], w[1]); r.code != 200 {
			t.Fatalf("POST %s: %d %s", w[0], r.code, r.body)
		}
	}
}

const txnSeed = `/t/a@0=1 /t/b@1="x" /t/d@0=[1,2]`

// wholeState returns every key as the server lists it, raw, and the
// listing's X-Seq: two equal answers mean nothing changed and no change
// was numbered between them (no key in these tests has a TTL, whose
// milliseconds left would differ).
func wholeState(t *testing.T, url string) (raw string, seq int64) {
	t.Helper()
	r := do(t, "GET", url+"/", "", "Accept", "application/json")
	if r.code != 200 {
		t.Fatalf("listing: %d %s", r.code, r.body)
	}
	seq, err := strconv.ParseInt(r.header.Get("X-Seq"), 10, 64)
	if err != nil {
		t.Fatalf("listing: X-Seq %q", r.header.Get("X-Seq"))
	}
	return r.body, seq
}

// stateString gives a listing as "key@revision=value …", a key with a
// TTL marked "+ttl" (its milliseconds left change).
func stateString(t *testing.T, raw string) string {
	t.Helper()
	var items []struct {
		Key      string
		Value    json.RawMessage
		Revision int64
		TTL      *int64
	}
	if err := json.Unmarshal([]byte(raw), &items); err != nil {
		t.Fatalf("listing %s: %v", raw, err)
	}
	var parts []string
	for _, it := range items {
		p := fmt.Sprintf("%s@%d=%s", it.Key, it.Revision, it.Value)
		if it.TTL != nil {
			p += "+ttl"
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, " ")
}

// txnAnswer is a transaction's answer, from either interface: the HTTP
// status (over the WebSocket 200 for ok, 409 for conflict, 0 for error),
// and what it carries.
type txnAnswer struct {
	code      int
	seq       int64
	revisions map[string]int64
	conflicts string // compact JSON
	err       string
	raw       string
}

// postTxn sends a transaction as POST /; headers are name, value pairs.
func postTxn(t *testing.T, url, body string, headers ...string) txnAnswer {
	t.Helper()
	r := do(t, "POST", url+"/", body, headers...)
	return parseHTTPTxn(t, r)
}

func parseHTTPTxn(t *testing.T, r response) txnAnswer {
	t.Helper()
	a := txnAnswer{code: r.code, raw: r.body}
	if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Errorf("answer %d: Content-Type %q; want application/json", r.code, ct)
	}
	var body struct {
		Seq       int64
		Revisions map[string]int64
		Error     string
		Conflicts json.RawMessage
	}
	if err := json.Unmarshal([]byte(r.body), &body); err != nil {
		t.Fatalf("answer %d %s: %v", r.code, r.body, err)
	}
	a.seq, a.revisions, a.err, a.conflicts = body.Seq, body.Revisions, body.Error, string(body.Conflicts)
	if r.code == 200 && r.header.Get("X-Seq") != strconv.FormatInt(body.Seq, 10) {
		t.Errorf("200: X-Seq %q; want the answer's seq %d", r.header.Get("X-Seq"), body.Seq)
	}
	return a
}

// wsTxn sends a transaction over the WebSocket, with an id, and reads
// its reply.
func wsTxn(t *testing.T, c *wsClient, payload string) txnAnswer {
	t.Helper()
	c.send(`{"type":"txn","id":"t1","payload":` + payload + `}`)
	raw := c.recvRaw()
	var m struct {
		Type    string
		Payload json.RawMessage
		ID      json.RawMessage
	}
	if err := json.Unmarshal([]byte(raw), &m); err != nil {
		t.Fatalf("reply %s: %v", raw, err)
	}
	if string(m.ID) != `"t1"` {
		t.Errorf("reply %s: id %s; want \"t1\"", raw, m.ID)
	}
	a := txnAnswer{raw: raw}
	switch m.Type {
	case "ok":
		a.code = 200
		var p struct {
			Seq       int64
			Revisions map[string]int64
		}
		if err := json.Unmarshal(m.Payload, &p); err != nil {
			t.Fatalf("ok %s: %v", raw, err)
		}
		a.seq, a.revisions = p.Seq, p.Revisions
	case "conflict":
		a.code = 409
		var p struct{ Conflicts json.RawMessage }
		if err := json.Unmarshal(m.Payload, &p); err != nil {
			t.Fatalf("conflict %s: %v", raw, err)
		}
		a.conflicts = string(p.Conflicts)
	case "error":
		if err := json.Unmarshal(m.Payload, &a.err); err != nil {
			t.Fatalf("error %s: %v", raw, err)
		}
	default:
		t.Fatalf("reply %s: want ok, conflict or error", raw)
	}
	return a
}

// txnCase is one answer of SPEC 11, over HTTP and the WebSocket.
type txnCase struct {
	name  string
	body  string // POST /'s body, and the txn message's payload
	only  string // "http" or "ws": a case of one interface alone
	code  int
	want  string // 200: the revisions; 409: the conflicts; else a part of the error
	state string // 200: the state after; "": unchanged
}

// txnCases start from txnSeed under txnFlags.
var txnCases = []txnCase{
	// Applied.
	{name: "sets and a delete", code: 200,
		body:  `{"ops":[{"op":"set","key":"/t/a","value":{"v":2}},{"op":"set","key":"/t/c","value":7},{"op":"delete","key":"/t/d"}]}`,
		want:  `{"/t/a":1,"/t/c":0,"/t/d":-1}`,
		state: `/t/a@1={"v":2} /t/b@1="x" /t/c@0=7`},
	{name: "checks that hold", code: 200,
		body:  `{"check":[{"key":"/t/a","revision":0},{"key":"/t/c","revision":-1},{"key":"/t/b","revision":1}],"ops":[{"op":"set","key":"/t/b","value":"y"}]}`,
		want:  `{"/t/b":2}`,
		state: `/t/a@0=1 /t/b@2="y" /t/d@0=[1,2]`},
	{name: "a value kept as written", code: 200,
		body:  `{"ops":[{"op":"set","key":"/t/a","value":{ "z" : 12345678901234567890, "a" : [ 1 , 2.50 ] }}]}`,
		want:  `{"/t/a":1}`,
		state: `/t/a@1={"z":12345678901234567890,"a":[1,2.50]} /t/b@1="x" /t/d@0=[1,2]`},
	{name: "null is a value", code: 200,
		body:  `{"check":null,"ops":[{"op":"set","key":"/t/c","value":null,"ttl":null}]}`,
		want:  `{"/t/c":0}`,
		state: `/t/a@0=1 /t/b@1="x" /t/c@0=null /t/d@0=[1,2]`},
	{name: "a TTL", code: 200,
		body:  `{"ops":[{"op":"set","key":"/t/c","value":1,"ttl":"1h 30m"},{"op":"set","key":"/t/a","value":2,"ttl":60000}]}`,
		want:  `{"/t/c":0,"/t/a":1}`,
		state: `/t/a@1=2+ttl /t/b@1="x" /t/c@0=1+ttl /t/d@0=[1,2]`},
	{name: "a delete of a missing key changes nothing", code: 200,
		body: `{"ops":[{"op":"delete","key":"/t/c"}]}`,
		want: `{"/t/c":-1}`},
	{name: "checks and deletes of missing keys change nothing", code: 200,
		body: `{"check":[{"key":"/t/b","revision":1}],"ops":[{"op":"delete","key":"/t/c"},{"op":"delete","key":"/t/e"}]}`,
		want: `{"/t/c":-1,"/t/e":-1}`},
	{name: "deletes make room under -max-keys", code: 200,
		body:  `{"ops":[{"op":"delete","key":"/t/a"},{"op":"set","key":"/t/c","value":1},{"op":"set","key":"/t/e","value":1}]}`,
		want:  `{"/t/a":-1,"/t/c":0,"/t/e":0}`,
		state: `/t/b@1="x" /t/c@0=1 /t/d@0=[1,2] /t/e@0=1`},
	{name: "KvServer spellings, echoed as spelled", only: "ws", code: 200,
		body:  `{"check":[{"key":"t/a","revision":0}],"ops":[{"op":"set","key":"t/a","value":2},{"op":"delete","key":"/t/b"}]}`,
		want:  `{"t/a":1,"/t/b":-1}`,
		state: `/t/a@1=2 /t/d@0=[1,2]`},

	// Conflicts: nothing applied, every failed check at its current version.
	{name: "a failed check", code: 409,
		body: `{"check":[{"key":"/t/a","revision":3}],"ops":[{"op":"set","key":"/t/a","value":2}]}`,
		want: `[{"key":"/t/a","value":1,"revision":0}]`},
	{name: "every failed check, in order", code: 409,
		body: `{"check":[{"key":"/t/d","revision":1},{"key":"/t/b","revision":1},{"key":"/t/c","revision":0}],"ops":[{"op":"set","key":"/t/e","value":1},{"op":"delete","key":"/t/a"}]}`,
		want: `[{"key":"/t/d","value":[1,2],"revision":0},{"key":"/t/c","value":null,"revision":-1}]`},
	{name: "a present key checked missing", code: 409,
		body: `{"check":[{"key":"/t/b","revision":-1}],"ops":[{"op":"set","key":"/t/b","value":0}]}`,
		want: `[{"key":"/t/b","value":"x","revision":1}]`},
	{name: "a conflict echoes KvServer spellings", only: "ws", code: 409,
		body: `{"check":[{"key":"t/b","revision":-1},{"key":"/t/a","revision":4}],"ops":[{"op":"set","key":"t/b","value":0}]}`,
		want: `[{"key":"t/b","value":"x","revision":1},{"key":"/t/a","value":1,"revision":0}]`},

	// Refused: nothing applied.
	{name: "not JSON", only: "http", code: 400, body: `{"ops":[`, want: "invalid transaction"},
	{name: "not an object", only: "http", code: 400, body: `[1]`, want: "invalid transaction"},
	{name: "two JSON values", only: "http", code: 400, body: `{"ops":[{"op":"delete","key":"/t/a"}]} {}`, want: "invalid transaction"},
	{name: "an unknown member", code: 400,
		body: `{"checks":[{"key":"/t/a","revision":5}],"ops":[{"op":"delete","key":"/t/a"}]}`, want: `"checks"`},
	{name: "an unknown member of an op", code: 400,
		body: `{"ops":[{"op":"set","key":"/t/a","value":1,"revison":3}]}`, want: `"revison"`},
	{name: "an unknown member of a check", code: 400,
		body: `{"check":[{"key":"/t/a","rev":0}],"ops":[{"op":"delete","key":"/t/a"}]}`, want: `"rev"`},
	{name: "ops not an array", code: 400, body: `{"ops":{"op":"delete","key":"/t/a"}}`, want: "invalid transaction"},
	{name: "a bad key", code: 400, body: `{"ops":[{"op":"set","key":"/t//a","value":1}]}`, want: `invalid key "/t//a"`},
	{name: "a prefix for a key", code: 400, body: `{"ops":[{"op":"delete","key":"/t/"}]}`, want: `"/t/"`},
	{name: "the root for a key", code: 400, body: `{"ops":[{"op":"set","key":"/","value":1}]}`, want: `"/"`},
	{name: "an empty key", code: 400, body: `{"ops":[{"op":"set","key":"","value":1}]}`, want: "invalid key"},
	{name: "KvServer's spelling over HTTP", only: "http", code: 400,
		body: `{"ops":[{"op":"set","key":"t/a","value":2}]}`, want: `invalid key "t/a"`},
	{name: "a bad key in a check", code: 400,
		body: `{"check":[{"key":"/t/../a","revision":0}],"ops":[{"op":"delete","key":"/t/a"}]}`, want: "check[0]"},
	{name: "a check without a revision", code: 400,
		body: `{"check":[{"key":"/t/a"}],"ops":[{"op":"delete","key":"/t/a"}]}`, want: "check[0]"},
	{name: "a check below -1", code: 400,
		body: `{"check":[{"key":"/t/a","revision":-2}],"ops":[{"op":"delete","key":"/t/a"}]}`, want: "revision -2"},
	{name: "an unknown op", code: 400, body: `{"ops":[{"op":"put","key":"/t/a","value":1}]}`, want: `unknown op "put"`},
	{name: "a missing op", code: 400, body: `{"ops":[{"key":"/t/a","value":1}]}`, want: `missing "op"`},
	{name: "a missing key", code: 400, body: `{"ops":[{"op":"set","value":1}]}`, want: `missing "key"`},
	{name: "a key twice", code: 400,
		body: `{"ops":[{"op":"set","key":"/t/a","value":1},{"op":"delete","key":"/t/a"}]}`, want: "ops[1]"},
	{name: "a key twice, spelled two ways", only: "ws", code: 400,
		body: `{"ops":[{"op":"set","key":"t/c","value":1},{"op":"set","key":"/t/c","value":2}]}`, want: "ops[1]"},
	{name: "a zero TTL", code: 400, body: `{"ops":[{"op":"set","key":"/t/c","value":1,"ttl":"0"}]}`, want: `"0"`},
	{name: "a negative TTL", code: 400, body: `{"ops":[{"op":"set","key":"/t/c","value":1,"ttl":-5}]}`, want: "-5"},
	{name: "a TTL of unknown unit", code: 400, body: `{"ops":[{"op":"set","key":"/t/c","value":1,"ttl":"5 parsecs"}]}`, want: "5 parsecs"},
	{name: "a set without a value", code: 400, body: `{"ops":[{"op":"set","key":"/t/c"}]}`, want: `missing "value"`},
	{name: "a delete with a value", code: 400, body: `{"ops":[{"op":"delete","key":"/t/a","value":1}]}`, want: "delete"},
	{name: "a delete with a TTL", code: 400, body: `{"ops":[{"op":"delete","key":"/t/a","ttl":"1s"}]}`, want: "delete"},
	{name: "a bad op after good ones", code: 400,
		body: `{"ops":[{"op":"set","key":"/t/a","value":9},{"op":"delete","key":"/t/b"},{"op":"set","key":"/t/c","value":1,"ttl":"0"}]}`, want: "ops[2]"},
	{name: "no ops", code: 400, body: `{"ops":[]}`, want: `no "ops"`},
	{name: "no ops member", code: 400, body: `{}`, want: `no "ops"`},
	{name: "checks alone", code: 400, body: `{"check":[{"key":"/t/a","revision":0}]}`, want: `no "ops"`},
	{name: "too many ops", code: 400,
		body: `{"ops":[{"op":"delete","key":"/t/a"},{"op":"delete","key":"/t/b"},{"op":"delete","key":"/t/c"},{"op":"delete","key":"/t/d"},{"op":"delete","key":"/t/e"}]}`,
		want: "5 ops, more than 4"},
	{name: "too many checks", code: 400,
		body: `{"check":[{"key":"/t/a","revision":0},{"key":"/t/b","revision":1},{"key":"/t/c","revision":-1},{"key":"/t/d","revision":0},{"key":"/t/e","revision":-1}],"ops":[{"op":"delete","key":"/t/a"}]}`,
		want: "5 checks, more than 4"},
	{name: "a value too large", code: 413,
		body: `{"ops":[{"op":"set","key":"/t/c","value":1},{"op":"set","key":"/t/a","value":"` + strings.Repeat("v", 70) + `"}]}`,
		want: "value larger than 64 bytes"},
	{name: "a body too large", only: "http", code: 413,
		body: `{"ops":[{"op":"set","key":"/t/c","value":1}],"check":[` + strings.Repeat(`{"key":"/t/a","revision":0},`, 40) + `{"key":"/t/a","revision":0}]}`,
		want: "larger than 1024 bytes"},
	{name: "past -max-keys", code: 507,
		body: `{"ops":[{"op":"set","key":"/t/c","value":1},{"op":"set","key":"/t/e","value":1}]}`, want: "at most 4 keys"},
	{name: "past -max-keys, counted after the deletes", code: 507,
		body: `{"ops":[{"op":"delete","key":"/t/a"},{"op":"set","key":"/t/c","value":1},{"op":"set","key":"/t/e","value":1},{"op":"set","key":"/t/f","value":1}]}`,
		want: "at most 4 keys"},
}

// TestTxnAnswers: every answer of SPEC 11, over HTTP (POST /) and the
// WebSocket (txn), each on a server holding txnSeed: the status (or
// reply), what it carries, and the state after, compared whole with the
// state before and its X-Seq: a transaction that changes nothing, and
// every refused one, leaves both as they were; one that changes takes
// exactly one seq, which it answers.
func TestTxnAnswers(t *testing.T) {
	for _, iface := range []string{"http", "ws"} {
		for _, tc := range txnCases {
			if tc.only != "" && tc.only != iface {
				continue
			}
			t.Run(iface+"/"+tc.name, func(t *testing.T) {
				_, url := newTestServer(t, txnFlags...)
				seedTxn(t, url)
				before, seq := wholeState(t, url)
				if got := stateString(t, before); got != txnSeed {
					t.Fatalf("seed: %s; want %s", got, txnSeed)
				}
				var a txnAnswer
				if iface == "http" {
					a = postTxn(t, url, tc.body)
				} else {
					a = wsTxn(t, dialWS(t, url, ""), tc.body)
				}
				checkTxnAnswer(t, iface, tc, a)
				after, seqAfter := wholeState(t, url)
				switch {
				case tc.code == 200 && tc.state != "":
					if got := stateString(t, after); got != tc.state {
						t.Errorf("state after: %s; want %s", got, tc.state)
					}
					if a.seq != seq+1 || seqAfter != seq+1 {
						t.Errorf("seq: answered %d, listing at %d; want both %d, one change after %d", a.seq, seqAfter, seq+1, seq)
					}
				case tc.code == 200:
					if after != before || seqAfter != seq || a.seq != seq {
						t.Errorf("a transaction that changes nothing: answered seq %d, state %s at %d; want seq %d and the state before, %s",
							a.seq, after, seqAfter, seq, before)
					}
				default:
					if after != before || seqAfter != seq {
						t.Errorf("refused, yet the state is %s at seq %d; want as before: %s at %d", after, seqAfter, before, seq)
					}
				}
			})
		}
	}
}

// checkTxnAnswer compares an answer with what tc wants of it.
func checkTxnAnswer(t *testing.T, iface string, tc txnCase, a txnAnswer) {
	t.Helper()
	code := tc.code
	if iface == "ws" && code != 200 && code != 409 {
		code = 0 // an error message
	}
	if a.code != code {
		t.Fatalf("answer %s; want %d (%s)", a.raw, tc.code, tc.want)
	}
	switch code {
	case 200:
		var want map[string]int64
		json.Unmarshal([]byte(tc.want), &want)
		if !sameRevisions(a.revisions, want) || len(a.revisions) != len(want) {
			t.Errorf("revisions %v; want %v", a.revisions, want)
		}
	case 409:
		if a.conflicts != tc.want {
			t.Errorf("conflicts %s; want %s", a.conflicts, tc.want)
		}
		if iface == "http" && !strings.Contains(a.err, "nothing was applied") {
			t.Errorf("409 error %q; want it to say nothing was applied", a.err)
		}
	default:
		if !strings.Contains(a.err, tc.want) {
			t.Errorf("error %q; want it to name %s", a.err, tc.want)
		}
	}
}

// TestTxnBodyTooLargeChunked: a body past -max-txn-bytes is 413 whether
// its length is announced or not (chunked), and nothing is applied.
func TestTxnBodyTooLargeChunked(t *testing.T) {
	_, url := newTestServer(t, txnFlags...)
	seedTxn(t, url)
	before, seq := wholeState(t, url)
	body := `{"ops":[{"op":"delete","key":"/t/a"}],"check":[` + strings.Repeat(`{"key":"/t/b","revision":1},`, 40) + `{"key":"/t/b","revision":1}]}`
	r := doChunked(t, "POST", url+"/", body)
	if r.code != 413 || !strings.Contains(errorMessage(r), "1024") {
		t.Errorf("chunked body of %d bytes: %d %s; want 413 naming the limit", len(body), r.code, r.body)
	}
	if after, seqAfter := wholeState(t, url); after != before || seqAfter != seq {
		t.Errorf("refused, yet the state is %s at %d; want %s at %d", after, seqAfter, before, seq)
	}
}

// TestTxnAccess: with -tokens, a transaction needs read on each checked
// key and write on each op's key, over HTTP and the WebSocket; refused
// with 401 or 403 (an error message on the WebSocket), nothing applied;
// and access is decided before any check, so a failing check the token
// may not read is 403, never a 409 that would show its value.
func TestTxnAccess(t *testing.T) {
	tokens := writeTokens(t,
		"mixed read /t/",
		"mixed write /t/w/",
		"writer write /t/w/",
		"all write /",
	)
	const (
		checkA  = `{"key":"/t/a","revision":0}`
		failA   = `{"key":"/t/a","revision":7}`
		setW    = `{"op":"set","key":"/t/w/x","value":1}`
		setA    = `{"op":"set","key":"/t/a","value":2}`
		outside = `{"op":"set","key":"/u/x","value":1}`
	)
	txn := func(checks, ops string) string { return `{"check":[` + checks + `],"ops":[` + ops + `]}` }
	for _, tt := range []struct {
		name, token, body string
		code              int
	}{
		{"no token", "", txn(checkA, setW), 401},
		{"no token, a failing check", "", txn(failA, setW), 401},
		{"unknown token", "nobody", txn(checkA, setW), 401},
		{"read on the check, write on the op", "mixed", txn(checkA, setW), 200},
		{"read on the check, write on the op, the check fails", "mixed", txn(failA, setW), 409},
		{"an op the token may only read", "mixed", txn(checkA, setW+","+setA), 403},
		{"an op outside the token", "mixed", txn("", setW+","+outside), 403},
		{"a check the token may not read", "writer", txn(checkA, setW), 403},
		{"a failing check the token may not read: 403, not its value", "writer", txn(failA, setW), 403},
		{"write everywhere", "all", txn(failA+","+checkA, setA), 409},
		{"write everywhere, checks hold", "all", txn(checkA, setA+","+outside), 200},
	} {
		for _, iface := range []string{"http", "ws"} {
			if iface == "ws" && (tt.token == "" || tt.token == "nobody") {
				continue // a WebSocket without a valid token does not open (TestAccessWebSocket)
			}
			t.Run(iface+"/"+tt.name, func(t *testing.T) {
				_, url := newTestServer(t, "-tokens", tokens)
				if r := do(t, "POST", url+"/t/a", `1`, "Authorization", "Bearer all"); r.code != 200 {
					t.Fatalf("seed: %d %s", r.code, r.body)
				}
				state := func() (string, int64) {
					r := do(t, "GET", url+"/", "", "Accept", "application/json", "Authorization", "Bearer all")
					seq, _ := strconv.ParseInt(r.header.Get("X-Seq"), 10, 64)
					return r.body, seq
				}
				before, seq := state()
				var a txnAnswer
				if iface == "http" {
					var headers []string
					if tt.token != "" {
						headers = []string{"Authorization", "Bearer " + tt.token}
					}
					a = postTxn(t, url, tt.body, headers...)
				} else {
					c, code := dialToken(t, url, tt.token)
					if c == nil {
						t.Fatalf("dial with %s: %d", tt.token, code)
					}
					a = wsTxn(t, c, tt.body)
				}
				want := tt.code
				if iface == "ws" && want != 200 && want != 409 {
					want = 0
				}
				if a.code != want {
					t.Fatalf("answer %s; want %d", a.raw, tt.code)
				}
				if a.code == 0 || a.code >= 400 && a.code != 409 {
					if strings.Contains(a.raw, `"value"`) || strings.Contains(a.raw, `"conflicts"`) {
						t.Errorf("a refusal shows a value: %s", a.raw)
					}
				}
				after, seqAfter := state()
				if changed := after != before || seqAfter != seq; changed != (tt.code == 200) {
					t.Errorf("answered %d; state %s at %d, before %s at %d", tt.code, after, seqAfter, before, seq)
				}
			})
		}
	}
}

// TestTxnEvents: a transaction's events on a stream share its seq and
// come back to back; every one but its last on that stream carries the
// stream's previous resume point (SSE: the id's seq field; WebSocket:
// seq, and "more": true), its last carries the seq. A stream that sees
// one event of the transaction gets it as a whole, tagged S; one that
// sees none gets nothing; a delete of a missing key is no event.
func TestTxnEvents(t *testing.T) {
	_, url := newTestServer(t)
	do(t, "POST", url+"/e/gone", `1`)
	do(t, "POST", url+"/e/a", `0`)
	sse, _ := openStream(t, url, "/e/")
	sseOther, _ := openStream(t, url, "/o/")
	ws := dialWS(t, url, "")
	ws.send(`{"type":"subscribe","id":1,"payload":{"key":"e/"}}`)
	if got := ws.recv(); got != `{"type":"ok","payload":{"key":"e/"},"id":1}` {
		t.Fatalf("subscribe: %s", got)
	}

	a := postTxn(t, url, `{"ops":[{"op":"set","key":"/e/a","value":1},{"op":"delete","key":"/e/gone"},{"op":"set","key":"/o/x","value":2},{"op":"delete","key":"/e/missing"},{"op":"set","key":"/e/b","value":3}]}`)
	if a.code != 200 {
		t.Fatalf("txn: %s", a.raw)
	}
	S := a.seq
	wantEvents := []string{"/e/a:1=1", "/e/b:0=3", "/e/gone:-1=null"}

	var got []string
	for i := range wantEvents {
		ev := next(t, sse)
		got = append(got, ev.String())
		switch last := i == len(wantEvents)-1; {
		case last && ev.seq != S:
			t.Errorf("SSE: the transaction's last event %v: id %q; want seq %d", ev, ev.id, S)
		case !last && ev.seq != S-1:
			t.Errorf("SSE: event %d of the transaction %v: id %q; want the stream's previous resume point %d", i, ev, ev.id, S-1)
		}
	}
	slices.Sort(got)
	if !slices.Equal(got, wantEvents) {
		t.Errorf("SSE /e/: %v; want %v", got, wantEvents)
	}
	if ev := next(t, sseOther); ev.String() != "/o/x:0=2" || ev.seq != S {
		t.Errorf("SSE /o/, one event of the transaction: %v (id %q); want /o/x:0=2 tagged %d", ev, ev.id, S)
	}

	got = nil
	for i := range wantEvents {
		var m struct {
			Type    string
			Payload struct {
				Key      string
				Value    json.RawMessage
				Revision *int64
				Seq      int64
				More     bool
				Reason   string
			}
		}
		raw := ws.recvRaw()
		json.Unmarshal([]byte(raw), &m)
		rev := int64(-1)
		if m.Payload.Revision != nil {
			rev = *m.Payload.Revision
		}
		value := string(m.Payload.Value)
		if m.Type == "no-value" {
			value = "null"
			if m.Payload.Reason != "deleted" {
				t.Errorf("WebSocket: %s; want reason deleted", raw)
			}
		}
		got = append(got, fmt.Sprintf("/%s:%d=%s", m.Payload.Key, rev, value))
		last := i == len(wantEvents)-1
		// Nothing was sent on this connection since the subscription:
		// its previous resume point is none, 0, or anything below S.
		if last && (m.Payload.Seq != S || m.Payload.More) || !last && (m.Payload.Seq >= S || !m.Payload.More) {
			t.Errorf("WebSocket: event %d of %d of the transaction: %s; want seq %d and no more on the last, an earlier seq and \"more\": true before it", i, len(wantEvents), raw, S)
		}
	}
	slices.Sort(got)
	if !slices.Equal(got, wantEvents) {
		t.Errorf("WebSocket e/: %v; want %v", got, wantEvents)
	}

	// A second transaction on the same streams: its joined events carry
	// the previous one's S, now the streams' resume point.
	b := postTxn(t, url, `{"check":[{"key":"/e/a","revision":1}],"ops":[{"op":"set","key":"/e/a","value":2},{"op":"set","key":"/e/b","value":4}]}`)
	if b.code != 200 || b.seq != S+1 {
		t.Fatalf("second txn: %s; want seq %d", b.raw, S+1)
	}
	for i := range 2 {
		ev := next(t, sse)
		if want := []int64{S, S + 1}[i]; ev.seq != want {
			t.Errorf("SSE: event %d of the second transaction %v tagged %d; want %d", i, ev, ev.seq, want)
		}
	}
	for i := range 2 {
		raw := ws.recvRaw()
		var m struct {
			Payload struct {
				Seq  int64
				More bool
			}
		}
		json.Unmarshal([]byte(raw), &m)
		if want := []int64{S, S + 1}[i]; m.Payload.Seq != want || m.Payload.More != (i == 0) {
			t.Errorf("WebSocket: event %d of the second transaction %s; want seq %d, more %v", i, raw, want, i == 0)
		}
	}
	// Nothing else came: a get's reply is next.
	ws.roundTrip(`{"type":"get","id":2,"payload":{"key":"/e/none"}}`, `{"type":"no-value","payload":{"key":"/e/none"},"id":2}`)
}
