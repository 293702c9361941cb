// The etcd client of the cluster mode (-etcd, SPEC section 12): etcd v3's
// JSON gateway spoken with net/http, so that the server needs no etcd
// module. It ranges, runs transactions, grants and revokes leases and
// watches a prefix; the node's view and the write path build on it.
//
// The gateway is gRPC's JSON mapping, POSTed over HTTP/1.1: int64 fields
// travel as strings, bytes as base64, and a field at its zero value is
// left out of every answer (false, 0, "", the first value of an enum:
// a PUT event has no "type", a failed txn no "succeeded", watch 0 no
// "watch_id"). The types below declare only what AtomKV uses, with the
// names of etcd's rpc.proto: snake_case, except the lease and status
// messages, whose proto fields are "ID", "TTL", "dbSize", "raftIndex".
//
// Which failures are tried again, on the next endpoint:
//
//   - a request that never left (no connection could be had: refused,
//     unreachable, TLS handshake failed): always, even a write;
//   - "etcdserver: no leader", "too many requests", "not capable",
//     "rpc not supported for learner": etcd says them before it proposes
//     anything, so a write was not applied. Every request asks for "no
//     leader" (gRPC metadata hasleader=true), so that a member cut off
//     from its quorum answers at once instead of when its own request
//     timeout runs out;
//   - anything else etcd or the network says after the request left
//     (timeouts, "leader changed", "server stopped", a connection
//     broken, a 5xx from a proxy): a read, or a write that is idempotent
//     (a lease revoke, a compaction), is tried again; any other write
//     may or may not have been applied, and ends in errOutcomeUnknown.
//
// A refusal (a request too large, too many operations, a duplicate key
// in a txn, a compacted revision, an unknown lease: gRPC's client-error
// codes) is etcd's answer, the same from every member, and is returned
// at once as an *etcdError that errors.Is errEtcdRefused and the
// refusal's own sentinel.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"os"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

var (
	// errOutcomeUnknown: a write reached etcd, or may have, and no answer
	// says whether it was applied. Trying it again could apply it twice;
	// AtomKV answers 503 "outcome unknown".
	errOutcomeUnknown = errors.New("etcd: the outcome of the write is unknown")
	// errEtcdUnavailable: no member answered before the deadline; the
	// request was not applied.
	errEtcdUnavailable = errors.New("etcd unavailable")
	// errEtcdRefused: etcd refused the request; trying it again changes
	// nothing. The sentinels after it say which refusal.
	errEtcdRefused       = errors.New("etcd refused the request")
	errEtcdTooLarge      = errors.New("etcd: request too large")
	errEtcdTooManyOps    = errors.New("etcd: too many operations in txn")
	errEtcdDuplicateKey  = errors.New("etcd: duplicate key in txn")
	errEtcdCompacted     = errors.New("etcd: revision compacted")
	errEtcdLeaseNotFound = errors.New("etcd: lease not found")
	// errWatchEnded: the watch stream ended or broke (the member stopped,
	// the connection broke); resume from the last revision seen.
	errWatchEnded = errors.New("etcd watch ended")
	// errWatchClosed: the watch was closed by its owner.
	errWatchClosed = errors.New("etcd watch closed")
)

// etcdRefusals name etcd's refusals by the start of their message.
var etcdRefusals = []struct {
	prefix string
	err    error
}{
	{"etcdserver: request is too large", errEtcdTooLarge},
	// Past --max-request-bytes plus gRPC's 512 KiB allowance, gRPC itself
	// refuses the message (ResourceExhausted, HTTP 429) before etcd sees it.
	{"grpc: received message larger than max", errEtcdTooLarge},
	{"etcdserver: too many operations in txn request", errEtcdTooManyOps},
	{"etcdserver: duplicate key given in txn request", errEtcdDuplicateKey},
	{"etcdserver: mvcc: required revision has been compacted", errEtcdCompacted},
	{"etcdserver: requested lease not found", errEtcdLeaseNotFound},
}

// etcdNotApplied are the errors etcd gives before it proposes a request,
// so that even a write is safe to send again.
var etcdNotApplied = []string{
	"etcdserver: no leader",
	"etcdserver: too many requests",
	"etcdserver: not capable",
	"etcdserver: rpc not supported for learner",
}

// An etcdError is an error etcd answered: gRPC's status code and message,
// and the HTTP status the gateway gave it (Code is 0 when the answer was
// no gRPC status, e.g. a proxy's 502).
type etcdError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Status  int    `json:"-"`
}

func (e *etcdError) Error() string { return "etcd: " + e.Message }

// Is matches errEtcdRefused for every refusal, and the refusal's own
// sentinel.
func (e *etcdError) Is(target error) bool {
	if target == errEtcdRefused {
		return e.refused()
	}
	for _, r := range etcdRefusals {
		if r.err == target && strings.HasPrefix(e.Message, r.prefix) {
			return true
		}
	}
	return false
}

// refused says whether etcd turned the request down for what it is, by
// gRPC's code: the client errors, and ResourceExhausted but for "too
// many requests", which passes.
func (e *etcdError) refused() bool {
	switch e.Code {
	case 3, 5, 6, 7, 9, 11, 12, 16: // InvalidArgument, NotFound, AlreadyExists, PermissionDenied, FailedPrecondition, OutOfRange, Unimplemented, Unauthenticated
		return true
	case 8: // ResourceExhausted: too large, database space exceeded
		return e.Message != "etcdserver: too many requests"
	case 0:
		return e.Status >= 400 && e.Status < 500 && e.Status != http.StatusTooManyRequests
	}
	return false
}

// notApplied says whether err is one of the answers etcd gives before it
// proposes anything.
func notApplied(err error) bool {
	var e *etcdError
	if !errors.As(err, &e) {
		return false
	}
	for _, m := range etcdNotApplied {
		if e.Message == m {
			return true
		}
	}
	return false
}

// An etcdCompactedError ends a watch whose start revision etcd has
// compacted away: its history is gone up to Revision, so the caller must
// read the state again (at Revision or later) and watch from there.
type etcdCompactedError struct{ Revision int64 }

func (e *etcdCompactedError) Error() string {
	return fmt.Sprintf("etcd: watch start compacted (history kept from revision %d)", e.Revision)
}

func (e *etcdCompactedError) Is(target error) bool { return target == errEtcdCompacted }

// An etcdClient sends requests to the members of one etcd cluster.
type etcdClient struct {
	endpoints []string // "http(s)://host:port", in the order preferred
	http      *http.Client
	// down[i] is when endpoint i may be tried first again (unix nanos)
	// after fails[i] failures in a row.
	down  []atomic.Int64
	fails []atomic.Int32
	// retryDown is how long an endpoint that failed once goes last; each
	// further failure doubles it, up to 32 times.
	retryDown time.Duration
	// tryTimeout bounds one attempt of a request that may be sent again,
	// so that a member that hangs costs a read this much, not its whole
	// deadline. A write has no such bound: cutting it short would make its
	// outcome unknown.
	tryTimeout time.Duration
}

// newEtcdClient returns a client of the cluster at endpoints, tried in the
// order given (a node that wants to spread its load orders them itself);
// tlsConf is for https endpoints (nil: the system's roots).
//
// It speaks HTTP/1.1 only: etcd sends HTTP/2 on a plain port to gRPC, not
// to the gateway, so one protocol behaves the same on http and https.
func newEtcdClient(endpoints []string, tlsConf *tls.Config) (*etcdClient, error) {
	if len(endpoints) == 0 {
		return nil, errors.New("no etcd endpoint")
	}
	c := &etcdClient{
		down:       make([]atomic.Int64, len(endpoints)),
		fails:      make([]atomic.Int32, len(endpoints)),
		retryDown:  time.Second,
		tryTimeout: 2 * time.Second,
		http: &http.Client{Transport: &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			DialContext:         (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 15 * time.Second}).DialContext,
			TLSClientConfig:     tlsConf,
			TLSHandshakeTimeout: 2 * time.Second,
			TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     90 * time.Second,
		}},
	}
	for _, e := range endpoints {
		u, err := url.Parse(e)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.Trim(u.Path, "/") != "" {
			return nil, fmt.Errorf("etcd endpoint %q: want http(s)://host:port", e)
		}
		c.endpoints = append(c.endpoints, u.Scheme+"://"+u.Host)
	}
	return c, nil
}

// close lets go of the client's idle connections.
func (c *etcdClient) close() { c.http.CloseIdleConnections() }

// order returns the endpoints in the order a request tries them: those
// not marked down, in the order given, then those marked down, soonest
// back first. A member that failed is tried last until its mark runs
// out, and first again after that: so the client comes back to it.
func (c *etcdClient) order() []int {
	now := time.Now().UnixNano()
	var up, down []int
	for i := range c.endpoints {
		if c.down[i].Load() <= now {
			up = append(up, i)
			continue
		}
		j := len(down)
		for j > 0 && c.down[down[j-1]].Load() > c.down[i].Load() {
			j--
		}
		down = append(down[:j], append([]int{i}, down[j:]...)...)
	}
	return append(up, down...)
}

// endpoint returns the endpoint the next request goes to first.
func (c *etcdClient) endpoint() string { return c.endpoints[c.order()[0]] }

func (c *etcdClient) markDown(i int) {
	n := min(c.fails[i].Add(1), 6)
	c.down[i].Store(time.Now().Add(c.retryDown << (n - 1)).UnixNano())
}

func (c *etcdClient) markUp(i int) {
	c.fails[i].Store(0)
	c.down[i].Store(0)
}

// call POSTs in to path and decodes the answer into out. idempotent says
// whether the request may be applied twice (reads, revokes, compactions).
func (c *etcdClient) call(ctx context.Context, path string, idempotent bool, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	return c.retry(ctx, idempotent, func(ctx context.Context, i int) (bool, error) {
		reflect.ValueOf(out).Elem().SetZero() // nothing left from a broken attempt
		return c.try(ctx, i, path, body, out)
	})
}

// retry makes attempt on the members in turn, as the package comment
// says, until one succeeds, one's error ends it, or ctx is done. An
// attempt reports whether its request may have left this process.
func (c *etcdClient) retry(ctx context.Context, idempotent bool, attempt func(ctx context.Context, i int) (sent bool, err error)) error {
	last := ctx.Err()
	for round := 0; ; round++ {
		for _, i := range c.order() {
			try, cancel := ctx, context.CancelFunc(func() {})
			if idempotent && c.tryTimeout > 0 {
				try, cancel = context.WithTimeout(ctx, c.tryTimeout)
			}
			sent, err := attempt(try, i)
			cancel()
			switch {
			case err == nil:
				c.markUp(i)
				return nil
			case errors.Is(err, errEtcdRefused):
				return err
			case sent && !idempotent && !notApplied(err):
				return fmt.Errorf("%w: %w", errOutcomeUnknown, err)
			case ctx.Err() != nil:
				return fmt.Errorf("%w: %w", errEtcdUnavailable, err)
			}
			c.markDown(i)
			last = err
		}
		t := time.NewTimer(min(50*time.Millisecond<<round, time.Second))
		select {
		case <-ctx.Done():
			t.Stop()
			if last == nil {
				last = ctx.Err()
			}
			return fmt.Errorf("%w: %w", errEtcdUnavailable, last)
		case <-t.C:
		}
	}
}

// try sends one request to endpoint i and decodes etcd's answer into out.
// sent says whether the request may have left: until the transport has a
// connection for it, not a byte of it was written.
func (c *etcdClient) try(ctx context.Context, i int, path string, body []byte, out any) (sent bool, err error) {
	var conn atomic.Bool
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(httptrace.GotConnInfo) { conn.Store(true) }})
	req, err := c.request(ctx, c.endpoints[i]+path, bytes.NewReader(body))
	if err != nil {
		return false, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return conn.Load(), err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return true, etcdErrorOf(resp)
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return true, fmt.Errorf("etcd %s: %w", path, err)
	}
	io.Copy(io.Discard, resp.Body) // so that the connection is reused
	return true, nil
}

// request returns a gateway POST of body to u.
func (c *etcdClient) request(ctx context.Context, u string, body io.Reader) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	// The gateway passes Grpc-Metadata-* on as gRPC metadata: with
	// hasleader=true a member without a leader answers "no leader" at once
	// and ends a watch when it loses its leader.
	req.Header.Set("Grpc-Metadata-Hasleader", "true")
	return req, nil
}

// etcdErrorOf reads the error a gateway answered: {"error", "message",
// "code"}, or whatever a proxy sent.
func etcdErrorOf(resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	e := &etcdError{Status: resp.StatusCode}
	if json.Unmarshal(b, e) != nil || e.Message == "" {
		e.Code, e.Message = 0, fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(b))
	}
	return e
}

// etcdHeader heads every answer. Revision is the store's revision when
// the member answered, even for a range at an older revision.
type etcdHeader struct {
	MemberID uint64 `json:"member_id,string"`
	Revision int64  `json:"revision,string"`
	RaftTerm uint64 `json:"raft_term,string"`
}

// An etcdKV is one key as etcd keeps it. Version counts the key's changes
// since it was created (1 for a new key); a missing key is version 0.
type etcdKV struct {
	Key            []byte `json:"key"`
	Value          []byte `json:"value"`
	CreateRevision int64  `json:"create_revision,string"`
	ModRevision    int64  `json:"mod_revision,string"`
	Version        int64  `json:"version,string"`
	Lease          int64  `json:"lease,string"`
}

// etcdRange reads the keys in [Key, RangeEnd) (Key alone without
// RangeEnd), at Revision (0: the latest). Linearizable unless
// Serializable. SortOrder is NONE, ASCEND or DESCEND, SortTarget KEY,
// VERSION, CREATE, MOD or VALUE.
type etcdRange struct {
	Key          []byte `json:"key"`
	RangeEnd     []byte `json:"range_end,omitempty"`
	Limit        int64  `json:"limit,omitempty,string"`
	Revision     int64  `json:"revision,omitempty,string"`
	SortOrder    string `json:"sort_order,omitempty"`
	SortTarget   string `json:"sort_target,omitempty"`
	Serializable bool   `json:"serializable,omitempty"`
	KeysOnly     bool   `json:"keys_only,omitempty"`
	CountOnly    bool   `json:"count_only,omitempty"`
}

type etcdRangeResponse struct {
	Header etcdHeader `json:"header"`
	KVs    []etcdKV   `json:"kvs"`
	More   bool       `json:"more"`         // Limit cut the answer short
	Count  int64      `json:"count,string"` // keys in the range, Limit or not
}

// rangeKeys reads keys.
func (c *etcdClient) rangeKeys(ctx context.Context, r etcdRange) (*etcdRangeResponse, error) {
	var resp etcdRangeResponse
	return &resp, c.call(ctx, "/v3/kv/range", true, r, &resp)
}

// rangePages reads [key, end) in pages of at most limit keys, all at one
// revision, the store's when the first page was read, so that together
// they are one consistent state; it calls page for each and returns the
// revision. A compaction past that revision before the last page ends
// it with errEtcdCompacted: read again.
func (c *etcdClient) rangePages(ctx context.Context, key, end []byte, limit int64, page func([]etcdKV) error) (int64, error) {
	r := etcdRange{Key: key, RangeEnd: end, Limit: limit}
	for {
		resp, err := c.rangeKeys(ctx, r)
		if err != nil {
			return 0, err
		}
		if r.Revision == 0 {
			r.Revision = resp.Header.Revision
		}
		if err := page(resp.KVs); err != nil {
			return 0, err
		}
		if !resp.More || len(resp.KVs) == 0 {
			return r.Revision, nil
		}
		last := resp.KVs[len(resp.KVs)-1].Key
		r.Key = append(append([]byte(nil), last...), 0) // the next key after last
	}
}

// etcdPrefixEnd returns the range end that covers every key starting
// with prefix: prefix with its last byte below 0xff incremented ("\x00",
// every key, if there is none).
func etcdPrefixEnd(prefix []byte) []byte {
	end := append([]byte(nil), prefix...)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return []byte{0}
}

// etcdCompare is one condition of a txn: key's Target (VERSION, CREATE,
// MOD, VALUE or LEASE) compared by Result (EQUAL, the default, NOT_EQUAL,
// GREATER or LESS) with the one field Target names; etcdIf fills it.
type etcdCompare struct {
	Result         string `json:"result,omitempty"`
	Target         string `json:"target"`
	Key            []byte `json:"key"`
	RangeEnd       []byte `json:"range_end,omitempty"`
	Version        *int64 `json:"version,omitempty,string"`
	CreateRevision *int64 `json:"create_revision,omitempty,string"`
	ModRevision    *int64 `json:"mod_revision,omitempty,string"`
	Lease          *int64 `json:"lease,omitempty,string"`
	Value          []byte `json:"value,omitempty"`
}

// etcdIf returns the condition "key's target result n": etcdIf(k,
// "VERSION", "EQUAL", 3); etcdIf(k, "CREATE", "EQUAL", 0) holds when k is
// missing.
func etcdIf(key []byte, target, result string, n int64) etcdCompare {
	c := etcdCompare{Result: result, Target: target, Key: key}
	switch target {
	case "VERSION":
		c.Version = &n
	case "CREATE":
		c.CreateRevision = &n
	case "MOD":
		c.ModRevision = &n
	case "LEASE":
		c.Lease = &n
	}
	return c
}

// An etcdOp is one operation of a txn: set exactly one field.
type etcdOp struct {
	Range  *etcdRange  `json:"request_range,omitempty"`
	Put    *etcdPut    `json:"request_put,omitempty"`
	Delete *etcdDelete `json:"request_delete_range,omitempty"`
}

// etcdPut sets Key to Value, attached to Lease (0: none).
type etcdPut struct {
	Key    []byte `json:"key"`
	Value  []byte `json:"value"`
	Lease  int64  `json:"lease,omitempty,string"`
	PrevKV bool   `json:"prev_kv,omitempty"`
}

// etcdDelete deletes Key, or the keys in [Key, RangeEnd).
type etcdDelete struct {
	Key      []byte `json:"key"`
	RangeEnd []byte `json:"range_end,omitempty"`
	PrevKV   bool   `json:"prev_kv,omitempty"`
}

// etcdTxn applies Success if every Compare holds, Failure if not: all of
// it at one revision. etcd refuses more than --max-txn-ops (128) in
// either list and a key put or deleted twice.
type etcdTxn struct {
	Compare []etcdCompare `json:"compare,omitempty"`
	Success []etcdOp      `json:"success,omitempty"`
	Failure []etcdOp      `json:"failure,omitempty"`
}

type etcdTxnResponse struct {
	Header    etcdHeader   `json:"header"`
	Succeeded bool         `json:"succeeded"`
	Responses []etcdResult `json:"responses"` // one per op of the branch taken
}

// An etcdResult answers one etcdOp; the one field set matches it.
type etcdResult struct {
	Range *etcdRangeResponse `json:"response_range"`
	Put   *struct {
		Header etcdHeader `json:"header"`
		PrevKV *etcdKV    `json:"prev_kv"`
	} `json:"response_put"`
	Delete *struct {
		Header  etcdHeader `json:"header"`
		Deleted int64      `json:"deleted,string"`
		PrevKVs []etcdKV   `json:"prev_kvs"`
	} `json:"response_delete_range"`
}

// txn runs t. A txn that only reads is sent again as a read is; one that
// writes, as a write.
func (c *etcdClient) txn(ctx context.Context, t etcdTxn) (*etcdTxnResponse, error) {
	reads := true
	for _, ops := range [][]etcdOp{t.Success, t.Failure} {
		for _, op := range ops {
			reads = reads && op.Range != nil
		}
	}
	var resp etcdTxnResponse
	return &resp, c.call(ctx, "/v3/kv/txn", reads, t, &resp)
}

// leaseGrant grants a lease of ttl seconds; etcd picks its id, and may
// grant a longer ttl (its minimum, about 1.5 election timeouts).
func (c *etcdClient) leaseGrant(ctx context.Context, ttl int64) (id, granted int64, err error) {
	var resp struct {
		ID    int64  `json:"ID,string"`
		TTL   int64  `json:"TTL,string"`
		Error string `json:"error"`
	}
	err = c.call(ctx, "/v3/lease/grant", false, struct {
		TTL int64 `json:"TTL,string"`
	}{ttl}, &resp)
	if err == nil && resp.Error != "" {
		err = &etcdError{Message: resp.Error}
	}
	return resp.ID, resp.TTL, err
}

// leaseRevoke revokes lease id, deleting its keys at one revision. It is
// sent again after any failure, so errEtcdLeaseNotFound means the lease
// is gone, whoever revoked it.
func (c *etcdClient) leaseRevoke(ctx context.Context, id int64) error {
	var resp struct{ Header etcdHeader }
	return c.call(ctx, "/v3/lease/revoke", true, struct {
		ID int64 `json:"ID,string"`
	}{id}, &resp)
}

// compact drops the history before revision, and returns when it is
// gone. AtomKV nodes never compact (etcd's own auto-compaction does);
// tests do.
func (c *etcdClient) compact(ctx context.Context, revision int64) error {
	var resp struct{ Header etcdHeader }
	return c.call(ctx, "/v3/kv/compaction", true, struct {
		Revision int64 `json:"revision,string"`
		Physical bool  `json:"physical"`
	}{revision, true}, &resp)
}

// etcdStatus is a member's account of itself. Leader is 0 while it has
// none; Errors lists alarms such as "NOSPACE".
type etcdStatus struct {
	Header    etcdHeader `json:"header"`
	Version   string     `json:"version"`
	DBSize    int64      `json:"dbSize,string"`
	Leader    uint64     `json:"leader,string"`
	RaftIndex uint64     `json:"raftIndex,string"`
	RaftTerm  uint64     `json:"raftTerm,string"`
	Errors    []string   `json:"errors"`
}

// status asks the member the next request would go to.
func (c *etcdClient) status(ctx context.Context) (*etcdStatus, error) {
	var resp etcdStatus
	return &resp, c.call(ctx, "/v3/maintenance/status", true, struct{}{}, &resp)
}

// etcdTLSConfig builds the TLS configuration of https endpoints from PEM
// files: the CA that signed the members' certificates (-etcd-ca; empty:
// the system's roots) and a client certificate and its key (-etcd-cert,
// -etcd-key; both or neither), for members that ask for one.
func etcdTLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("-etcd-ca: %w", err)
		}
		conf.RootCAs = x509.NewCertPool()
		if !conf.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("-etcd-ca %s: no PEM certificate in it", caFile)
		}
	}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("-etcd-cert and -etcd-key go together")
	}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("-etcd-cert %s, -etcd-key %s: %w", certFile, keyFile, err)
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return conf, nil
}

// etcdWatchCreate asks for the changes of [Key, RangeEnd) (Key alone
// without RangeEnd) from StartRevision on (0: from the next change);
// PrevKV adds each key's previous state to its events, ProgressNotify
// asks for a progress response when nothing changed for a while (etcd's
// --experimental-watch-progress-notify-interval, 10 minutes by default).
type etcdWatchCreate struct {
	Key            []byte `json:"key"`
	RangeEnd       []byte `json:"range_end,omitempty"`
	StartRevision  int64  `json:"start_revision,omitempty,string"`
	ProgressNotify bool   `json:"progress_notify,omitempty"`
	PrevKV         bool   `json:"prev_kv,omitempty"`
}

// An etcdEvent is one key's change. Type is "DELETE", or "" for a PUT
// (the enum's default, which the gateway leaves out). A delete's KV has
// only the key and, as ModRevision, the revision of the delete.
type etcdEvent struct {
	Type   string  `json:"type"`
	KV     etcdKV  `json:"kv"`
	PrevKV *etcdKV `json:"prev_kv"`
}

// An etcdWatchResponse is one message of a watch: the events of one or
// more revisions, in order, never part of a revision; or, without events,
// a progress report that the watch has seen up to Header.Revision.
type etcdWatchResponse struct {
	Header          etcdHeader  `json:"header"`
	WatchID         int64       `json:"watch_id,string"`
	Created         bool        `json:"created"`
	Canceled        bool        `json:"canceled"`
	CompactRevision int64       `json:"compact_revision,string"`
	CancelReason    string      `json:"cancel_reason"`
	Events          []etcdEvent `json:"events"`
}

// progress says whether r is a progress report: the answer to a
// requestProgress (watch id -1) or a progress_notify.
func (r *etcdWatchResponse) progress() bool {
	return len(r.Events) == 0 && !r.Created && !r.Canceled
}

// An etcdWatch is one watch stream: a POST /v3/watch whose request body
// stays open, so that progress requests can follow the create request,
// and whose response is a stream of JSON messages.
//
// etcd serves the gateway with Go's HTTP/1 server, which reads and throws
// away up to 256 KiB of a request body it has not read before it writes
// a response's headers (net/http: "consumes any unread portion of the
// request body before beginning to write the response"): so a body left
// open gets no answer at all, and a request sent while that runs is
// lost. The create request is therefore followed by blanks, which JSON
// allows between messages, until the response's headers come; after
// that the body reaches etcd's watch, message by message.
type etcdWatch struct {
	header etcdHeader // of the "created" message: the store's revision when the watch began
	body   *io.PipeWriter
	resp   *http.Response
	dec    *json.Decoder
	cancel context.CancelFunc // ends the request
	mu     sync.Mutex         // held while writing body
	fed    chan struct{}      // closed when the blanks are written
	closed atomic.Bool
	err    error // the error that ended the stream, for every later next
}

// watch opens a watch of create on the first member that answers, and
// returns once etcd has created it. ctx bounds the opening only; the
// watch runs until Close, an error, or the member's end.
func (c *etcdClient) watch(ctx context.Context, create etcdWatchCreate) (*etcdWatch, error) {
	first, err := json.Marshal(struct {
		Create etcdWatchCreate `json:"create_request"`
	}{create})
	if err != nil {
		return nil, err
	}
	var w *etcdWatch
	err = c.retry(ctx, true, func(ctx context.Context, i int) (sent bool, err error) {
		w, err = c.openWatch(ctx, i, first)
		return true, err
	})
	return w, err
}

// openWatch opens a watch on member i and reads its "created" message.
func (c *etcdClient) openWatch(ctx context.Context, i int, first []byte) (*etcdWatch, error) {
	stream, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, cancel)
	pr, pw := io.Pipe()
	req, err := c.request(stream, c.endpoints[i]+"/v3/watch", pr)
	if err != nil {
		cancel()
		return nil, err
	}
	w := &etcdWatch{body: pw, cancel: cancel, fed: make(chan struct{})}
	answered := make(chan struct{})
	w.mu.Lock()
	go func() {
		defer close(w.fed)
		defer w.mu.Unlock()
		if _, err := pw.Write(first); err != nil {
			return
		}
		blank := bytes.Repeat([]byte{' '}, 16<<10)
		for {
			select {
			case <-answered:
				return
			default:
			}
			if _, err := pw.Write(blank); err != nil {
				return
			}
		}
	}()
	w.resp, err = c.http.Do(req)
	close(answered)
	if err == nil && w.resp.StatusCode != http.StatusOK {
		err = etcdErrorOf(w.resp)
	}
	if err == nil {
		w.dec = json.NewDecoder(w.resp.Body)
		var r *etcdWatchResponse
		if r, err = w.next(); err == nil && !r.Created {
			err = fmt.Errorf("%w: the first message is not \"created\"", errWatchEnded)
		} else if err == nil {
			w.header = r.Header
		}
	}
	if !stop() && err == nil {
		err = ctx.Err()
	}
	if err != nil {
		w.Close()
		return nil, err
	}
	return w, nil
}

// next returns the watch's next message: events, or a progress report.
// An error ends the watch; the caller closes it and, but for an
// *etcdCompactedError (errEtcdCompacted: read the state again), watches
// again from the revision after the last it has seen. The errors:
// *etcdCompactedError; *etcdError, what etcd said ("no leader", a cancel
// with its reason); errWatchEnded, the stream ended or broke;
// errWatchClosed, after Close.
func (w *etcdWatch) next() (*etcdWatchResponse, error) {
	if w.err != nil {
		return nil, w.err
	}
	var msg struct {
		Result *etcdWatchResponse `json:"result"`
		Error  *struct {
			Code    int    `json:"grpc_code"`
			Status  int    `json:"http_code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	err := w.dec.Decode(&msg)
	r := msg.Result
	switch {
	case err != nil && w.closed.Load():
		err = errWatchClosed
	case err != nil:
		err = fmt.Errorf("%w: %w", errWatchEnded, err)
	case msg.Error != nil:
		err = &etcdError{Code: msg.Error.Code, Message: msg.Error.Message, Status: msg.Error.Status}
	case r == nil:
		err = fmt.Errorf("%w: a message without a result", errWatchEnded)
	case r.Canceled && r.CompactRevision != 0:
		err = &etcdCompactedError{Revision: r.CompactRevision}
	case r.Canceled:
		err = &etcdError{Message: "watch canceled: " + r.CancelReason}
	}
	if err != nil {
		w.err = err
		return nil, err
	}
	return r, nil
}

// requestProgress asks etcd for a progress report, which next returns
// with watch id -1 and the store's current revision.
//
// Before etcd 3.4.25 and 3.5.8 (etcd-io/etcd#15220) the report is sent
// beside the watch's events, not after them: events of revisions up to
// the one reported may still come after it. The report tells that etcd
// was at that revision, not that every change up to it was delivered.
func (w *etcdWatch) requestProgress() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, err := w.body.Write([]byte(`{"progress_request":{}}`)); err != nil {
		if w.closed.Load() {
			return errWatchClosed
		}
		return fmt.Errorf("%w: %w", errWatchEnded, err)
	}
	return nil
}

// Close ends the watch: etcd cancels it when the connection goes. A next
// blocked at the time returns errWatchClosed.
func (w *etcdWatch) Close() error {
	if w.closed.Swap(true) {
		return nil
	}
	w.body.CloseWithError(errWatchClosed)
	w.cancel()
	if w.resp != nil {
		w.resp.Body.Close()
	}
	<-w.fed
	return nil
}
