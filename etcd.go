// The etcd client of the cluster mode (-etcd, SPEC section 12): etcd v3's
// JSON gateway spoken with net/http, so that the server needs no etcd
// module. It ranges, runs txns, grants and revokes leases and watches a
// prefix; the node's view and its writes build on it.
//
// The gateway is gRPC's JSON mapping POSTed over HTTP/1.1: int64 fields
// travel as strings, bytes as base64, and an answer leaves out every
// field at its zero value (false, 0, "", an enum's first value: a PUT
// event has no "type", a failed txn no "succeeded", watch 0 no
// "watch_id"). The types declare only what AtomKV uses, named as in
// etcd's rpc.proto: snake_case, but "ID", "TTL", "dbSize" where the proto
// says so.
//
// What is sent again, to the next member:
//
//   - a request that never left (no connection was had: refused,
//     unreachable, TLS handshake failed), even a write;
//   - "no leader", "too many requests", "not capable", "rpc not
//     supported for learner": etcd says them before it proposes
//     anything, so a write was not applied. Every request sends gRPC
//     metadata hasleader=true, so that a member cut off from its quorum
//     says "no leader" at once rather than time out;
//   - anything else said or broken after the request left (timeouts,
//     "leader changed", "server stopped", a connection cut, a proxy's
//     5xx): a read or an idempotent write (lease revoke, compaction) is
//     sent again; any other write may or may not have been applied, and
//     ends in errOutcomeUnknown.
//
// A refusal (a request too large, too many operations or a key twice in
// a txn, a compacted revision, an unknown lease: gRPC's client-error
// codes) is the same from every member: it is returned at once, as an
// *etcdError that errors.Is errEtcdRefused and its own sentinel.
//
// retry counts, for /metrics, every attempt by what it was for (its
// latency too), every error a request ends with, and every attempt sent
// again (etcdStats): atomics, on the one path every request takes.

package main

import (
	"bytes"
	"cmp"
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
	"slices"
	"strings"
	"sync/atomic"
	"time"
)

var (
	// errOutcomeUnknown: a write left, and no answer says whether etcd
	// applied it; sending it again could apply it twice.
	errOutcomeUnknown = errors.New("etcd: the outcome of the write is unknown")
	// errEtcdUnavailable: no member answered in time; nothing was applied.
	errEtcdUnavailable = errors.New("etcd unavailable")
	// errEtcdRefused matches every refusal, the sentinels after it one each.
	errEtcdRefused       = errors.New("etcd refused the request")
	errEtcdTooLarge      = errors.New("etcd: request too large")
	errEtcdTooManyOps    = errors.New("etcd: too many operations in txn")
	errEtcdDuplicateKey  = errors.New("etcd: duplicate key in txn")
	errEtcdCompacted     = errors.New("etcd: revision compacted")
	errEtcdLeaseNotFound = errors.New("etcd: lease not found")
	// errWatchEnded: the watch stream ended or broke; watch again from the
	// revision after the last one seen.
	errWatchEnded  = errors.New("etcd watch ended")
	errWatchClosed = errors.New("etcd watch closed")
)

// etcdRefusals name refusals by how their message starts.
var etcdRefusals = []struct {
	prefix string
	err    error
}{
	{"etcdserver: request is too large", errEtcdTooLarge},
	// Past --max-request-bytes and gRPC's 512 KiB allowance, gRPC refuses
	// the message itself (ResourceExhausted, HTTP 429).
	{"grpc: received message larger than max", errEtcdTooLarge},
	{"etcdserver: too many operations in txn request", errEtcdTooManyOps},
	{"etcdserver: duplicate key given in txn request", errEtcdDuplicateKey},
	{"etcdserver: mvcc: required revision has been compacted", errEtcdCompacted},
	{"etcdserver: requested lease not found", errEtcdLeaseNotFound},
}

// etcdBeforeProposal are the errors etcd gives before it proposes a request.
var etcdBeforeProposal = []string{"etcdserver: no leader", "etcdserver: too many requests",
	"etcdserver: not capable", "etcdserver: rpc not supported for learner"}

// An etcdError is what etcd answered: gRPC's code and message, and the
// HTTP status (Code 0: no gRPC status came, e.g. a proxy's 502).
type etcdError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Status  int    `json:"-"`
}

func (e *etcdError) Error() string { return "etcd: " + e.Message }

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

// refused says whether etcd turned the request down for what it is: by
// gRPC's client-error codes, of which ResourceExhausted holds "too many
// requests", which passes.
func (e *etcdError) refused() bool {
	switch e.Code {
	case 3, 5, 6, 7, 9, 11, 12, 16: // InvalidArgument, NotFound, AlreadyExists, PermissionDenied, FailedPrecondition, OutOfRange, Unimplemented, Unauthenticated
		return true
	case 8: // ResourceExhausted
		return e.Message != "etcdserver: too many requests"
	case 0:
		return e.Status >= 400 && e.Status < 500 && e.Status != http.StatusTooManyRequests
	}
	return false
}

// etcdNotApplied says whether err is etcd's word that it proposed nothing.
func etcdNotApplied(err error) bool {
	var e *etcdError
	return errors.As(err, &e) && slices.Contains(etcdBeforeProposal, e.Message)
}

// An etcdCompactedError ends a watch from a revision etcd compacted away:
// history starts at Revision, so read the state again and watch from it.
type etcdCompactedError struct{ Revision int64 }

func (e *etcdCompactedError) Error() string {
	return fmt.Sprintf("etcd: watch start compacted (history kept from revision %d)", e.Revision)
}

func (e *etcdCompactedError) Is(target error) bool { return target == errEtcdCompacted }

// An etcdClient sends requests to the members of one etcd cluster.
type etcdClient struct {
	endpoints []string // "http(s)://host:port", in the order preferred
	http      *http.Client
	stats     etcdStats
	// down[i] is when endpoint i is tried first again (unix nanos), after
	// fails[i] failures in a row: retryDown, doubled for each further one
	// up to 32 times, so a dead member costs little and a revived one is
	// soon used again.
	down       []atomic.Int64
	fails      []atomic.Int32
	retryDown  time.Duration
	tryTimeout time.Duration // bounds one attempt of a request sent again: a hung member costs a read this, not its deadline
}

// newEtcdClient returns a client of the members at endpoints, in the order
// given (a node that wants to spread its load orders them); tlsConf is
// for https (nil: the system's roots). It speaks HTTP/1.1 only: on a
// plain port etcd sends HTTP/2 to gRPC, not the gateway, so one protocol
// behaves the same with and without TLS.
func newEtcdClient(endpoints []string, tlsConf *tls.Config) (*etcdClient, error) {
	if len(endpoints) == 0 {
		return nil, errors.New("no etcd endpoint")
	}
	c := &etcdClient{down: make([]atomic.Int64, len(endpoints)), fails: make([]atomic.Int32, len(endpoints)),
		retryDown: time.Second, tryTimeout: 2 * time.Second}
	c.http = &http.Client{Transport: &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 15 * time.Second}).DialContext,
		TLSClientConfig:     tlsConf,
		TLSHandshakeTimeout: 2 * time.Second,
		TLSNextProto:        map[string]func(string, *tls.Conn) http.RoundTripper{},
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     90 * time.Second,
	}}
	for _, e := range endpoints {
		u, err := url.Parse(e)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.Trim(u.Path, "/") != "" {
			return nil, fmt.Errorf("etcd endpoint %q: want http(s)://host:port", e)
		}
		c.endpoints = append(c.endpoints, u.Scheme+"://"+u.Host)
	}
	return c, nil
}

// close lets go of the idle connections.
func (c *etcdClient) close() { c.http.CloseIdleConnections() }

// order returns the endpoints in the order a request tries them: those
// not marked down, then those marked down, each in the order given.
func (c *etcdClient) order() []int {
	now := time.Now().UnixNano()
	var up, down []int
	for i := range c.endpoints {
		if c.down[i].Load() <= now {
			up = append(up, i)
		} else {
			down = append(down, i)
		}
	}
	return append(up, down...)
}

// endpoint returns the endpoint the next request goes to first.
func (c *etcdClient) endpoint() string { return c.endpoints[c.order()[0]] }

func (c *etcdClient) markDown(i int) {
	n := min(c.fails[i].Add(1), 6)
	c.down[i].Store(time.Now().Add(c.retryDown << (n - 1)).UnixNano())
}

// etcdCall POSTs in to path on c and returns the answer; trip is what
// /metrics counts it as; idempotent says whether the request may be
// applied twice.
func etcdCall[T any](ctx context.Context, c *etcdClient, trip etcdTrip, path string, idempotent bool, in any) (*T, error) {
	body, err := json.Marshal(in)
	if err != nil {
		return nil, err
	}
	var out *T
	err = c.retry(ctx, trip, idempotent, func(ctx context.Context, i int) (bool, error) {
		out = new(T) // nothing kept from a broken attempt
		return c.try(ctx, c.endpoints[i]+path, body, out)
	})
	if err != nil {
		return nil, err
	}
	if h, ok := any(out).(etcdHeaded); ok {
		c.stats.saw(h.header().Revision)
	}
	return out, nil
}

// retry makes attempt on the members in turn, as the file's comment says,
// until one succeeds, an error ends it, or ctx is done. An attempt says
// whether its request may have left. Each attempt is a round trip of
// kind trip for /metrics, and the error retry ends with is counted.
func (c *etcdClient) retry(ctx context.Context, trip etcdTrip, idempotent bool, attempt func(ctx context.Context, i int) (sent bool, err error)) error {
	last := ctx.Err()
	for round := 0; ; round++ {
		for _, i := range c.order() {
			try, cancel := ctx, context.CancelFunc(func() {})
			if idempotent {
				try, cancel = context.WithTimeout(ctx, c.tryTimeout)
			}
			start := time.Now()
			sent, err := attempt(try, i)
			c.stats.trips[trip].observe(time.Since(start))
			cancel()
			if err != nil {
				c.stats.noteError(c.endpoints[i], err)
			}
			switch {
			case err == nil:
				c.fails[i].Store(0)
				c.down[i].Store(0)
				return nil
			case errors.Is(err, errEtcdRefused):
				return c.stats.failed(err)
			case sent && !idempotent && !etcdNotApplied(err):
				return c.stats.failed(fmt.Errorf("%w: %w", errOutcomeUnknown, err))
			case ctx.Err() != nil:
				return c.stats.failed(fmt.Errorf("%w: %w", errEtcdUnavailable, err))
			}
			c.markDown(i)
			c.stats.retries.Add(1)
			last = err
		}
		select {
		case <-ctx.Done():
			return c.stats.failed(fmt.Errorf("%w: %w", errEtcdUnavailable, cmp.Or(last, ctx.Err())))
		case <-time.After(min(50*time.Millisecond<<round, time.Second)):
		}
	}
}

// An etcdTrip is what a round trip to etcd was for: the kind label of
// /metrics' atomkv_etcd_request_duration_seconds.
type etcdTrip int

const (
	tripRange  etcdTrip = iota // a read: keys, a page of the prefix, etcd's revision
	tripTxn                    // a transaction, an expiry, a read in a txn
	tripPut                    // a write of one key on no condition
	tripDelete                 // a delete of one key on no condition
	tripLease                  // a lease granted or revoked
	tripWatch                  // a watch opened, until etcd says it is created
	tripFence                  // a fence written (clusterread.go)
	tripOther                  // status, compaction
	etcdTrips
)

var etcdTripNames = [etcdTrips]string{"range", "txn", "put", "delete", "lease", "watch", "fence", "other"}

// etcdStats is what a client counts for /metrics and the console: atomics
// that each round trip adds to, and the last error, kept only when one
// comes.
type etcdStats struct {
	trips    [etcdTrips]histogram   // each attempt, by what it was for
	errors   [etcdErrs]atomic.Int64 // requests that failed, by why
	retries  atomic.Int64           // attempts that failed and were sent again
	revision atomic.Int64           // etcd's latest revision, as far as answers said
	last     atomic.Pointer[etcdLastError]
}

// An etcdLastError is the last error a request or the watch met: when,
// at which member, and what it was.
type etcdLastError struct {
	At       time.Time `json:"at"`
	Endpoint string    `json:"endpoint"`
	Error    string    `json:"error"`
}

// failed counts a request that ended with err, and returns err.
func (s *etcdStats) failed(err error) error {
	s.errors[etcdErrorOf(err)].Add(1)
	return err
}

// noteError keeps err, met at endpoint, as the last error.
func (s *etcdStats) noteError(endpoint string, err error) {
	s.last.Store(&etcdLastError{At: time.Now(), Endpoint: endpoint, Error: err.Error()})
}

// saw records that etcd's revision was rev when it answered.
func (s *etcdStats) saw(rev int64) {
	for {
		cur := s.revision.Load()
		if rev <= cur || s.revision.CompareAndSwap(cur, rev) {
			return
		}
	}
}

// etcdHeaded is an answer that carries etcd's header.
type etcdHeaded interface{ header() etcdHeader }

// try POSTs body to u and decodes the answer into out. sent says whether
// the request may have left: until the transport had a connection for
// it, not a byte was written.
func (c *etcdClient) try(ctx context.Context, u string, body []byte, out any) (sent bool, err error) {
	var conn atomic.Bool
	ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(httptrace.GotConnInfo) { conn.Store(true) }})
	resp, err := c.post(ctx, u, bytes.NewReader(body))
	if err != nil {
		return conn.Load(), err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return true, fmt.Errorf("etcd %s: %w", u, err)
	}
	io.Copy(io.Discard, resp.Body) // so that the connection is used again
	return true, nil
}

// post POSTs body to u, and returns the response if it is a 200.
func (c *etcdClient) post(ctx context.Context, u string, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	// The gateway passes Grpc-Metadata-* on as gRPC metadata.
	req.Header.Set("Grpc-Metadata-Hasleader", "true")
	resp, err := c.http.Do(req)
	if err != nil || resp.StatusCode == http.StatusOK {
		return resp, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	e := &etcdError{Status: resp.StatusCode} // {"error", "message", "code"}
	if json.Unmarshal(b, e) != nil || e.Message == "" {
		e.Code, e.Message = 0, fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(b))
	}
	return nil, e
}

// etcdHeader heads every answer. Revision is the store's when the member
// answered, even for a range at an older revision.
type etcdHeader struct {
	MemberID uint64 `json:"member_id,string"`
	Revision int64  `json:"revision,string"`
}

// etcdAnswer is an answer of which only the header is read (a put's, a
// delete's, a fence's).
type etcdAnswer struct {
	Header etcdHeader `json:"header"`
}

func (a *etcdAnswer) header() etcdHeader { return a.Header }

// An etcdKV is a key as etcd keeps it. Version counts its changes since
// it was created (1 when new, 0 when missing).
type etcdKV struct {
	Key            []byte `json:"key"`
	Value          []byte `json:"value"`
	CreateRevision int64  `json:"create_revision,string"`
	ModRevision    int64  `json:"mod_revision,string"`
	Version        int64  `json:"version,string"`
	Lease          int64  `json:"lease,string"`
}

// etcdRange reads [Key, RangeEnd) (Key alone without RangeEnd) at
// Revision (0: the latest); linearizable unless Serializable.
type etcdRange struct {
	Key          []byte `json:"key"`
	RangeEnd     []byte `json:"range_end,omitempty"`
	Limit        int64  `json:"limit,omitempty,string"`
	Revision     int64  `json:"revision,omitempty,string"`
	SortOrder    string `json:"sort_order,omitempty"`  // NONE, ASCEND, DESCEND
	SortTarget   string `json:"sort_target,omitempty"` // KEY, VERSION, CREATE, MOD, VALUE
	Serializable bool   `json:"serializable,omitempty"`
	KeysOnly     bool   `json:"keys_only,omitempty"`
	CountOnly    bool   `json:"count_only,omitempty"`
}

type etcdRangeResponse struct {
	Header etcdHeader `json:"header"`
	KVs    []etcdKV   `json:"kvs"`
	More   bool       `json:"more"`         // Limit left keys out
	Count  int64      `json:"count,string"` // the keys in the range, whatever Limit
}

func (r *etcdRangeResponse) header() etcdHeader { return r.Header }

func (c *etcdClient) rangeKeys(ctx context.Context, r etcdRange) (*etcdRangeResponse, error) {
	return etcdCall[etcdRangeResponse](ctx, c, tripRange, "/v3/kv/range", true, r)
}

// rangePages reads [key, end) in pages of at most limit keys, all at the
// revision of the first, so that together they are one state; it calls
// page for each and returns the revision. A compaction past it before
// the last page ends it with errEtcdCompacted: read again.
func (c *etcdClient) rangePages(ctx context.Context, key, end []byte, limit int64, page func([]etcdKV) error) (int64, error) {
	r := etcdRange{Key: key, RangeEnd: end, Limit: limit}
	for {
		resp, err := c.rangeKeys(ctx, r)
		if err != nil {
			return 0, err
		}
		r.Revision = cmp.Or(r.Revision, resp.Header.Revision)
		if err := page(resp.KVs); err != nil {
			return 0, err
		}
		if !resp.More || len(resp.KVs) == 0 {
			return r.Revision, nil
		}
		r.Key = append(slices.Clone(resp.KVs[len(resp.KVs)-1].Key), 0) // the key after the last
	}
}

// etcdPrefixEnd returns the range end of the keys that start with prefix:
// prefix with its last byte below 0xff incremented ("\x00", all keys, if
// there is none).
func etcdPrefixEnd(prefix []byte) []byte {
	for i := len(prefix) - 1; i >= 0; i-- {
		if prefix[i] < 0xff {
			return append(slices.Clone(prefix[:i]), prefix[i]+1)
		}
	}
	return []byte{0}
}

// etcdCompare is a condition of a txn: Key's Target (VERSION, CREATE, MOD,
// VALUE or LEASE) compared by Result (EQUAL, the default, NOT_EQUAL,
// GREATER or LESS) with the field Target names. Set that one only: etcd
// refuses two, and compares with 0 when there is none, so a 0 left out
// still counts ({Target: "CREATE", Key: k} holds when k is missing).
type etcdCompare struct {
	Result         string `json:"result,omitempty"`
	Target         string `json:"target"`
	Key            []byte `json:"key"`
	RangeEnd       []byte `json:"range_end,omitempty"`
	Version        int64  `json:"version,omitempty,string"`
	CreateRevision int64  `json:"create_revision,omitempty,string"`
	ModRevision    int64  `json:"mod_revision,omitempty,string"`
	Lease          int64  `json:"lease,omitempty,string"`
	Value          []byte `json:"value,omitempty"`
}

// An etcdOp is one operation of a txn: set one field.
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

// etcdDelete deletes Key, or [Key, RangeEnd).
type etcdDelete struct {
	Key      []byte `json:"key"`
	RangeEnd []byte `json:"range_end,omitempty"`
	PrevKV   bool   `json:"prev_kv,omitempty"`
}

// etcdTxn applies Success if every Compare holds, else Failure, at one
// revision. etcd refuses more than --max-txn-ops (128) in a list, and a
// key written twice.
type etcdTxn struct {
	Compare []etcdCompare `json:"compare,omitempty"`
	Success []etcdOp      `json:"success,omitempty"`
	Failure []etcdOp      `json:"failure,omitempty"`
}

type etcdTxnResponse struct {
	Header    etcdHeader `json:"header"`
	Succeeded bool       `json:"succeeded"`
	Responses []struct { // one per op of the branch taken, its field set
		Range *etcdRangeResponse `json:"response_range"`
		Put   *struct {
			PrevKV *etcdKV `json:"prev_kv"`
		} `json:"response_put"`
		Delete *struct {
			Deleted int64    `json:"deleted,string"`
			PrevKVs []etcdKV `json:"prev_kvs"`
		} `json:"response_delete_range"`
	} `json:"responses"`
}

func (r *etcdTxnResponse) header() etcdHeader { return r.Header }

// txn runs t: as a read if it only reads, else as a write.
func (c *etcdClient) txn(ctx context.Context, t etcdTxn) (*etcdTxnResponse, error) {
	reads := true
	for _, op := range slices.Concat(t.Success, t.Failure) {
		reads = reads && op.Range != nil
	}
	return etcdCall[etcdTxnResponse](ctx, c, tripTxn, "/v3/kv/txn", reads, t)
}

// leaseGrant grants a lease of ttl seconds; etcd picks its id, and may
// grant more (its minimum, about 1.5 election timeouts).
func (c *etcdClient) leaseGrant(ctx context.Context, ttl int64) (id, granted int64, err error) {
	type lease struct {
		ID  int64 `json:"ID,omitempty,string"`
		TTL int64 `json:"TTL,string"`
	}
	resp, err := etcdCall[lease](ctx, c, tripLease, "/v3/lease/grant", false, lease{TTL: ttl})
	if err != nil {
		return 0, 0, err
	}
	return resp.ID, resp.TTL, nil
}

// leaseRevoke revokes lease id, deleting its keys at one revision. It is
// sent again after any failure, so errEtcdLeaseNotFound may answer an
// attempt of its own that did revoke it: either way the lease is gone.
func (c *etcdClient) leaseRevoke(ctx context.Context, id int64) error {
	_, err := etcdCall[struct{}](ctx, c, tripLease, "/v3/lease/revoke", true, struct {
		ID int64 `json:"ID,string"`
	}{id})
	return err
}

// compact drops the history before revision, and returns once it is
// gone. Nodes never compact (etcd's auto-compaction does); tests do.
func (c *etcdClient) compact(ctx context.Context, revision int64) error {
	_, err := etcdCall[struct{}](ctx, c, tripOther, "/v3/kv/compaction", true, struct {
		Revision int64 `json:"revision,string"`
		Physical bool  `json:"physical"`
	}{revision, true})
	return err
}

// etcdStatus is a member's account of itself: Leader is the leader's
// member id; Errors lists alarms such as NOSPACE.
type etcdStatus struct {
	Header  etcdHeader `json:"header"`
	Version string     `json:"version"`
	Leader  uint64     `json:"leader,string"`
	Errors  []string   `json:"errors"`
}

func (s *etcdStatus) header() etcdHeader { return s.Header }

// status asks the member the next request goes to; while it has no
// leader it says "no leader".
func (c *etcdClient) status(ctx context.Context) (*etcdStatus, error) {
	return etcdCall[etcdStatus](ctx, c, tripOther, "/v3/maintenance/status", true, struct{}{})
}

// etcdTLSConfig builds the TLS configuration of https endpoints from PEM
// files: the CA of the members' certificates (-etcd-ca; empty: the
// system's), and a client certificate and its key (-etcd-cert,
// -etcd-key; both or neither) for members that ask for one.
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
