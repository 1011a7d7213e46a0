// Command loadgen holds a slice of the benchmark's watch streams: the Go twin of
// bench/loadgen.py, with the same JSON-lines commands on stdin and answers on stdout
// (open, storm, wait, receipts, close, stats, quit), so bench/workers.py drives either.
//
// It speaks two protocols, chosen by --proto:
//
//	cp    controlplane.watch.v1.WatchService/WatchBundles (the control plane and
//	      bench/bareserver.py), one server-streaming call per node;
//	etcd  etcdserverpb.Watch/Watch, one bidirectional call per node holding one watcher
//	      on --etcd-key.
//
// Messages go over the wire as raw bytes and are encoded and decoded with protowire; the
// field numbers are not written here but generated at build time from the .proto files
// (fields_gen.go, by bench/gobuild.py). Streams are spread round-robin over --channels
// connections, each dialled from the next --source-addrs address, so tens of thousands of
// streams and reconnects do not run one source address out of ports.
//
// Built at benchmark time (GOPATH mode, Debian's golang-google-grpc-dev), never committed.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand"
	"net"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// rawCodec passes bytes through: the streams encode and decode their own messages.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	switch b := v.(type) {
	case []byte:
		return b, nil
	case *[]byte:
		return *b, nil
	}
	return nil, fmt.Errorf("rawCodec: %T is not bytes", v)
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	p, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: %T is not *[]byte", v)
	}
	*p = data
	return nil
}

func (rawCodec) Name() string { return "proto" }

const (
	cpMethod   = "/controlplane.watch.v1.WatchService/WatchBundles"
	etcdMethod = "/etcdserverpb.Watch/Watch"
)

var (
	cpDesc   = &grpc.StreamDesc{StreamName: "WatchBundles", ServerStreams: true}
	etcdDesc = &grpc.StreamDesc{StreamName: "Watch", ServerStreams: true, ClientStreams: true}
)

// The agent's reconnect policy, as in bench/loadgen.py: full jitter, 0.5 s doubling to 30 s.
const (
	backoffBase = 0.5
	backoffCap  = 30.0
)

var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
	codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
	codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
	codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED",
	codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS",
	codes.Unauthenticated: "UNAUTHENTICATED",
}

func codeOf(err error) (string, string) {
	st, _ := status.FromError(err)
	name, ok := codeNames[st.Code()]
	if !ok {
		name = st.Code().String()
	}
	return name, st.Message()
}

func now() float64 { return float64(time.Now().UnixNano()) / 1e9 }

type node struct {
	NodeID     string `json:"node_id"`
	Token      string `json:"token"`
	Credential string `json:"credential"`
}

type stream struct {
	nodeID   string
	auth     string
	channel  int
	cursor   int64
	epoch    string
	mode     string
	ready    bool
	failed   string
	attempts int
	tOpen    float64
	tStarted float64
	tReady   float64
	tFailed  float64
	cancel   context.CancelFunc
	done     chan struct{}
}

type waiter struct {
	need int
	ch   chan struct{}
}

type worker struct {
	target   string
	proto    string
	etcdKey  []byte
	srcAddrs []string
	nChan    int
	conns    []*grpc.ClientConn

	mu       sync.Mutex // everything below
	streams  []*stream
	receipts map[int64][]float64
	waiters  map[int64]*waiter
	unready  int
	allReady chan struct{}
	retry    string
	messages int
	events   int
	received int
	resets   int
	errors   map[string]int
	drops    map[string]int
	details  map[string]int
}

func newWorker(target, proto, etcdKey string, srcAddrs []string, channels int, nodes []node) (*worker, error) {
	w := &worker{
		target: target, proto: proto, etcdKey: []byte(etcdKey), srcAddrs: srcAddrs,
		receipts: map[int64][]float64{}, waiters: map[int64]*waiter{},
		errors: map[string]int{}, drops: map[string]int{}, details: map[string]int{},
	}
	w.nChan = channels
	if w.nChan < 1 {
		w.nChan = 1
	}
	if w.nChan > len(nodes) && len(nodes) > 0 {
		w.nChan = len(nodes)
	}
	if err := w.dial(); err != nil {
		return nil, err
	}
	for i, n := range nodes {
		tok := n.Token
		if tok == "" {
			tok = n.Credential
		}
		auth := ""
		if tok != "" {
			auth = "Bearer " + tok
		}
		w.streams = append(w.streams, &stream{nodeID: n.NodeID, auth: auth, channel: i % w.nChan})
	}
	return w, nil
}

// dial opens one HTTP/2 connection per channel (a ClientConn to one address holds one).
func (w *worker) dial() error {
	w.conns = make([]*grpc.ClientConn, w.nChan)
	for i := range w.conns {
		d := &net.Dialer{}
		if len(w.srcAddrs) > 0 {
			ip := net.ParseIP(w.srcAddrs[i%len(w.srcAddrs)])
			if ip == nil {
				return fmt.Errorf("--source-addrs: %q is not an IP address", w.srcAddrs[i%len(w.srcAddrs)])
			}
			d.LocalAddr = &net.TCPAddr{IP: ip}
		}
		conn, err := grpc.Dial(
			w.target,
			grpc.WithInsecure(),
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
				return d.DialContext(ctx, "tcp", addr)
			}),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})),
		)
		if err != nil {
			return err
		}
		w.conns[i] = conn
	}
	return nil
}

func (w *worker) closeConns() {
	for _, c := range w.conns {
		c.Close()
	}
}

// -- messages -------------------------------------------------------------------------

// fields walks the top-level fields of a message, calling f with each field's number,
// wire type and value (varint value, or the bytes of a length-delimited field).
func fields(b []byte, f func(num protowire.Number, typ protowire.Type, v uint64, sub []byte)) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		switch typ {
		case protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return protowire.ParseError(m)
			}
			f(num, typ, v, nil)
			b = b[m:]
		case protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return protowire.ParseError(m)
			}
			f(num, typ, 0, v)
			b = b[m:]
		default:
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return protowire.ParseError(m)
			}
			b = b[m:]
		}
	}
	return nil
}

func cpRequest(nodeID string, since int64, epoch string) []byte {
	var b []byte
	b = protowire.AppendTag(b, fWatchBundlesRequest_node_id, protowire.BytesType)
	b = protowire.AppendString(b, nodeID)
	if since != 0 {
		b = protowire.AppendTag(b, fWatchBundlesRequest_since_revision, protowire.VarintType)
		b = protowire.AppendVarint(b, uint64(since))
	}
	if epoch != "" {
		b = protowire.AppendTag(b, fWatchBundlesRequest_epoch, protowire.BytesType)
		b = protowire.AppendString(b, epoch)
	}
	return b
}

func etcdCreate(key []byte, startRevision int64) []byte {
	var c []byte
	c = protowire.AppendTag(c, fWatchCreateRequest_key, protowire.BytesType)
	c = protowire.AppendBytes(c, key)
	if startRevision > 0 {
		c = protowire.AppendTag(c, fWatchCreateRequest_start_revision, protowire.VarintType)
		c = protowire.AppendVarint(c, uint64(startRevision))
	}
	var b []byte
	b = protowire.AppendTag(b, fWatchRequest_create_request, protowire.BytesType)
	return protowire.AppendBytes(b, c)
}

// receipt records that a stream received `rev` at `t`. Called with w.mu held.
func (w *worker) receipt(rev int64, t float64) {
	times := append(w.receipts[rev], t)
	w.receipts[rev] = times
	w.received++
	if wt, ok := w.waiters[rev]; ok && len(times) >= wt.need {
		close(wt.ch)
		delete(w.waiters, rev)
	}
}

func (w *worker) markReady(s *stream, t float64) {
	s.ready = true
	s.tReady = t
	w.unready--
	if w.unready <= 0 && w.allReady != nil {
		close(w.allReady)
		w.allReady = nil
	}
}

func (w *worker) markFailed(s *stream, code string) {
	s.failed = code
	s.tFailed = now()
	w.unready--
	if w.unready <= 0 && w.allReady != nil {
		close(w.allReady)
		w.allReady = nil
	}
}

// onCP handles one WatchBundlesResponse; true if it ends with a closing bookmark.
func (w *worker) onCP(s *stream, msg []byte, t float64) (bool, error) {
	closing := false
	w.mu.Lock()
	defer w.mu.Unlock()
	w.messages++
	err := fields(msg, func(num protowire.Number, _ protowire.Type, _ uint64, ev []byte) {
		if num != fWatchBundlesResponse_events {
			return
		}
		w.events++
		_ = fields(ev, func(kind protowire.Number, _ protowire.Type, _ uint64, body []byte) {
			switch kind {
			case fWatchEvent_desired:
				var rev int64
				_ = fields(body, func(f protowire.Number, _ protowire.Type, v uint64, _ []byte) {
					if f == fDesiredState_revision {
						rev = int64(v)
					}
				})
				s.cursor = rev
				w.receipt(rev, t)
			case fWatchEvent_bookmark:
				_ = fields(body, func(f protowire.Number, _ protowire.Type, v uint64, _ []byte) {
					switch f {
					case fBookmark_revision:
						s.cursor = int64(v)
					case fBookmark_closing:
						closing = v != 0
					}
				})
				if !s.ready {
					w.markReady(s, t)
				}
			case fWatchEvent_snapshot_end:
				_ = fields(body, func(f protowire.Number, _ protowire.Type, v uint64, _ []byte) {
					if f == fSnapshotEnd_revision {
						s.cursor = int64(v)
					}
				})
				if !s.ready {
					w.markReady(s, t)
				}
			case fWatchEvent_started:
				_ = fields(body, func(f protowire.Number, _ protowire.Type, v uint64, sub []byte) {
					switch f {
					case fStreamStarted_epoch:
						s.epoch = string(sub)
					case fStreamStarted_mode:
						s.mode = cpModes[v]
					}
				})
				s.tStarted = t
			case fWatchEvent_reset:
				w.resets++
			}
		})
	})
	return closing, err
}

// onEtcd handles one WatchResponse; an error ends the stream (cancelled or compacted).
func (w *worker) onEtcd(s *stream, msg []byte, t float64, fresh bool) error {
	var header int64
	var created, canceled bool
	var compact int64
	var revs []int64
	err := fields(msg, func(num protowire.Number, _ protowire.Type, v uint64, sub []byte) {
		switch num {
		case fWatchResponse_header:
			_ = fields(sub, func(f protowire.Number, _ protowire.Type, v uint64, _ []byte) {
				if f == fResponseHeader_revision {
					header = int64(v)
				}
			})
		case fWatchResponse_created:
			created = v != 0
		case fWatchResponse_canceled:
			canceled = v != 0
		case fWatchResponse_compact_revision:
			compact = int64(v)
		case fWatchResponse_events:
			_ = fields(sub, func(f protowire.Number, _ protowire.Type, _ uint64, kv []byte) {
				if f != fEvent_kv {
					return
				}
				_ = fields(kv, func(g protowire.Number, _ protowire.Type, v uint64, _ []byte) {
					if g == fKeyValue_mod_revision {
						revs = append(revs, int64(v))
					}
				})
			})
		}
	})
	w.mu.Lock()
	defer w.mu.Unlock()
	w.messages++
	if err != nil {
		return err
	}
	if created {
		s.tStarted = t
		if fresh {
			// A watch from "now" covers every revision after the header's.
			s.cursor = header
			s.mode = "CREATED"
		} else {
			s.mode = "CREATED_FROM_REVISION"
		}
		if !s.ready {
			w.markReady(s, t)
		}
	}
	for _, rev := range revs {
		w.events++
		s.cursor = rev
		w.receipt(rev, t)
	}
	if canceled || compact != 0 {
		w.resets++
		return fmt.Errorf("watch canceled (compact_revision %d)", compact)
	}
	return nil
}

// -- one stream -----------------------------------------------------------------------

// once runs one call of stream s until it ends; it answers whether any message arrived,
// whether the last one was a closing bookmark, and the status code name.
func (w *worker) once(ctx context.Context, s *stream, since int64, epoch string) (bool, bool, string) {
	w.mu.Lock()
	conn := w.conns[s.channel]
	w.mu.Unlock()
	// One context per call, so a call the server ended leaves nothing open behind it.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if s.auth != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", s.auth)
	}
	gotAny, closing := false, false
	fail := func(err error) (bool, bool, string) {
		name, detail := codeOf(err)
		if !gotAny {
			w.mu.Lock()
			d := name + ": " + detail
			if len(d) > 120 {
				d = d[:120]
			}
			w.details[d]++
			w.mu.Unlock()
		}
		return gotAny, closing, name
	}
	if w.proto == "etcd" {
		cs, err := conn.NewStream(ctx, etcdDesc, etcdMethod)
		if err != nil {
			return fail(err)
		}
		start := int64(0)
		if since > 0 {
			start = since + 1
		}
		if err := cs.SendMsg(etcdCreate(w.etcdKey, start)); err != nil {
			return fail(err)
		}
		for {
			var b []byte
			if err := cs.RecvMsg(&b); err != nil {
				if errors.Is(err, io.EOF) {
					return gotAny, false, "OK"
				}
				return fail(err)
			}
			gotAny = true
			if err := w.onEtcd(s, b, now(), since == 0); err != nil {
				return gotAny, false, "WATCH_CANCELED"
			}
		}
	}
	cs, err := conn.NewStream(ctx, cpDesc, cpMethod)
	if err != nil {
		return fail(err)
	}
	if err := cs.SendMsg(cpRequest(s.nodeID, since, epoch)); err != nil {
		return fail(err)
	}
	if err := cs.CloseSend(); err != nil {
		return fail(err)
	}
	for {
		var b []byte
		if err := cs.RecvMsg(&b); err != nil {
			if errors.Is(err, io.EOF) {
				return gotAny, closing, "OK"
			}
			return fail(err)
		}
		gotAny = true
		c, err := w.onCP(s, b, now())
		if err != nil {
			return gotAny, false, "BAD_MESSAGE"
		}
		closing = c
	}
}

func (w *worker) run(ctx context.Context, s *stream, resume bool, delay time.Duration) {
	defer close(s.done)
	if delay > 0 {
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
	}
	failures := 0
	for {
		w.mu.Lock()
		since, epoch := int64(0), ""
		if resume {
			since, epoch = s.cursor, s.epoch
		}
		s.attempts++
		if s.tOpen == 0 {
			s.tOpen = now()
		}
		w.mu.Unlock()
		gotAny, closing, code := w.once(ctx, s, since, epoch)
		if ctx.Err() != nil {
			return
		}
		w.mu.Lock()
		if gotAny {
			w.drops[code]++
		} else {
			w.errors[code]++
		}
		if !s.ready && w.retry == "none" {
			w.markFailed(s, code)
			w.mu.Unlock()
			return
		}
		resume = s.cursor > 0
		w.mu.Unlock()
		if closing {
			failures = 0
			continue
		}
		if gotAny {
			failures = 0
		} else {
			failures++
		}
		wait := rand.Float64() * math.Min(backoffCap, backoffBase*math.Pow(2, math.Max(0, float64(failures-1))))
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Duration(wait * float64(time.Second))):
		}
	}
}

// -- commands -------------------------------------------------------------------------

type cmd map[string]interface{}

func (c cmd) num(k string, def float64) float64 {
	if v, ok := c[k].(float64); ok {
		return v
	}
	return def
}

func (c cmd) str(k, def string) string {
	if v, ok := c[k].(string); ok {
		return v
	}
	return def
}

func sleepUntil(at float64) {
	if d := at - now(); d > 0 {
		time.Sleep(time.Duration(d * float64(time.Second)))
	}
}

func (w *worker) start(at float64, resume bool, batch int, interval float64, retry string, within float64) map[string]interface{} {
	w.mu.Lock()
	w.retry = retry
	ch := make(chan struct{})
	w.allReady = ch
	w.unready = len(w.streams)
	if w.unready == 0 {
		close(ch)
		w.allReady = nil
	}
	errors0, drops0, msgs0 := copyCounts(w.errors), copyCounts(w.drops), w.messages
	for _, s := range w.streams {
		s.ready, s.failed, s.attempts = false, "", 0
		s.tOpen, s.tStarted, s.tReady, s.tFailed = 0, 0, 0, 0
	}
	w.mu.Unlock()
	sleepUntil(at)
	tStart := now()
	for i, s := range w.streams {
		delay := time.Duration(0)
		if batch > 0 {
			delay = time.Duration(float64(i/batch) * interval * float64(time.Second))
		}
		ctx, cancel := context.WithCancel(context.Background())
		w.mu.Lock()
		s.cancel = cancel
		s.done = make(chan struct{})
		w.mu.Unlock()
		go w.run(ctx, s, resume, delay)
	}
	select {
	case <-ch:
	case <-time.After(time.Duration(within * float64(time.Second))):
	}
	return w.openReport(tStart, now(), errors0, drops0, msgs0)
}

func copyCounts(m map[string]int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func minus(a, b map[string]int) map[string]int {
	out := map[string]int{}
	for k, v := range a {
		if d := v - b[k]; d > 0 {
			out[k] = d
		}
	}
	return out
}

func (w *worker) openReport(tStart, tEnd float64, errors0, drops0 map[string]int, msgs0 int) map[string]interface{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	readyTimes, startedAfter, failedAfter := []float64{}, []float64{}, []float64{}
	failed, modes := map[string]int{}, map[string]int{}
	ready, retries := 0, 0
	for _, s := range w.streams {
		if s.ready {
			ready++
			readyTimes = append(readyTimes, s.tReady)
			startedAfter = append(startedAfter, s.tStarted-tStart)
			modes[s.mode]++
		} else if s.failed != "" {
			failed[s.failed]++
			failedAfter = append(failedAfter, s.tFailed-tStart)
		}
		if s.attempts > 1 {
			retries += s.attempts - 1
		}
	}
	nFailed := 0
	for _, v := range failed {
		nFailed += v
	}
	return map[string]interface{}{
		"t_start": tStart, "t_end": tEnd, "n": len(w.streams), "ready": ready,
		"failed": failed, "pending": len(w.streams) - ready - nFailed,
		"ready_times": readyTimes, "started_after": startedAfter, "failed_after": failedAfter,
		"details": copyCounts(w.details), "modes": modes, "retries": retries,
		"errors": minus(w.errors, errors0), "drops": minus(w.drops, drops0),
		"messages": w.messages - msgs0,
	}
}

func (w *worker) cancelAll() {
	w.mu.Lock()
	var waits []chan struct{}
	for _, s := range w.streams {
		if s.cancel != nil {
			s.cancel()
			waits = append(waits, s.done)
			s.cancel = nil
		}
	}
	w.mu.Unlock()
	for _, d := range waits {
		<-d
	}
}

func (w *worker) redial() error {
	w.closeConns()
	return w.dial()
}

func (w *worker) handle(c cmd) (map[string]interface{}, error) {
	switch c.str("cmd", "") {
	case "open":
		if c["fresh_channels"] == true {
			if err := w.redial(); err != nil {
				return nil, err
			}
		}
		return w.start(c.num("at", 0), c.str("since", "zero") == "cursor", int(c.num("batch", 0)),
			c.num("interval", 0), c.str("retry", "agent"), c.num("timeout", 60)), nil
	case "storm":
		sleepUntil(c.num("at", 0))
		tDrop := now()
		w.cancelAll()
		if c.str("kind", "streams") == "channels" {
			if err := w.redial(); err != nil {
				return nil, err
			}
		}
		r := w.start(0, true, 0, 0, "agent", c.num("timeout", 60))
		r["t_drop"] = tDrop
		return r, nil
	case "wait":
		rev, need := int64(c.num("rev", 0)), int(c.num("need", -1))
		w.mu.Lock()
		if need < 0 {
			need = 0
			for _, s := range w.streams {
				if s.ready {
					need++
				}
			}
		}
		var ch chan struct{}
		if len(w.receipts[rev]) < need {
			wt, ok := w.waiters[rev]
			if !ok || wt.need != need {
				wt = &waiter{need: need, ch: make(chan struct{})}
				w.waiters[rev] = wt
			}
			ch = wt.ch
		}
		w.mu.Unlock()
		if ch != nil {
			select {
			case <-ch:
			case <-time.After(time.Duration(c.num("timeout", 30) * float64(time.Second))):
			}
		}
		w.mu.Lock()
		count := len(w.receipts[rev])
		if wt, ok := w.waiters[rev]; ok && wt.ch == ch {
			delete(w.waiters, rev)
		}
		w.mu.Unlock()
		return map[string]interface{}{"rev": rev, "count": count, "need": need}, nil
	case "receipts":
		out := map[string][]float64{}
		revs, _ := c["revs"].([]interface{})
		w.mu.Lock()
		for _, r := range revs {
			if f, ok := r.(float64); ok {
				times := w.receipts[int64(f)]
				if times == nil {
					times = []float64{}
				}
				out[strconv.FormatInt(int64(f), 10)] = times
			}
		}
		w.mu.Unlock()
		return map[string]interface{}{"receipts": out}, nil
	case "close":
		w.cancelAll()
		if c["channels"] == true {
			if err := w.redial(); err != nil {
				return nil, err
			}
		}
		return map[string]interface{}{"closed": len(w.streams)}, nil
	case "stats":
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		cpu := float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
		w.mu.Lock()
		defer w.mu.Unlock()
		ready := 0
		for _, s := range w.streams {
			if s.ready {
				ready++
			}
		}
		return map[string]interface{}{
			"messages": w.messages, "events": w.events, "received": w.received,
			"errors": copyCounts(w.errors), "drops": copyCounts(w.drops), "resets": w.resets,
			"ready": ready, "cpu": cpu, "connections": len(w.conns),
		}, nil
	}
	return nil, fmt.Errorf("unknown command %q", c.str("cmd", ""))
}

func main() {
	target := flag.String("target", "", "host:port of the server")
	nodesFile := flag.String("nodes-file", "", "JSON list of {node_id, token|credential}")
	channels := flag.Int("channels", 1, "HTTP/2 connections")
	proto := flag.String("proto", "cp", "cp (WatchBundles) or etcd (etcd v3 Watch)")
	etcdKey := flag.String("etcd-key", "bench/fleet", "the key every etcd watcher watches")
	srcAddrs := flag.String("source-addrs", "", "comma-separated local addresses to dial from, round-robin")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run here (go tool pprof)")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "--cpuprofile:", err)
			os.Exit(2)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "--cpuprofile:", err)
			os.Exit(2)
		}
		defer pprof.StopCPUProfile()
	}
	if *proto != "cp" && *proto != "etcd" {
		fmt.Fprintf(os.Stderr, "--proto: %q is neither cp nor etcd\n", *proto)
		os.Exit(2)
	}
	raw, err := os.ReadFile(*nodesFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "--nodes-file:", err)
		os.Exit(2)
	}
	var nodes []node
	if err := json.Unmarshal(raw, &nodes); err != nil {
		fmt.Fprintln(os.Stderr, "--nodes-file:", err)
		os.Exit(2)
	}
	var addrs []string
	if *srcAddrs != "" {
		addrs = strings.Split(*srcAddrs, ",")
	}
	w, err := newWorker(*target, *proto, *etcdKey, addrs, *channels, nodes)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var outMu sync.Mutex
	out := bufio.NewWriter(os.Stdout)
	in := bufio.NewReaderSize(os.Stdin, 1<<20)
	for {
		line, err := in.ReadBytes('\n')
		if len(line) == 0 && err != nil {
			break
		}
		var c cmd
		if err := json.Unmarshal(line, &c); err != nil {
			fmt.Fprintln(os.Stderr, "bad command:", err)
			continue
		}
		if c.str("cmd", "") == "quit" {
			break
		}
		go func(c cmd) {
			result, err := w.handle(c)
			if err != nil {
				result = map[string]interface{}{"error": err.Error()}
			}
			result["id"] = c["id"]
			b, _ := json.Marshal(result)
			outMu.Lock()
			out.Write(b)
			out.WriteByte('\n')
			out.Flush()
			outMu.Unlock()
		}(c)
	}
	w.cancelAll()
	w.closeConns()
}
