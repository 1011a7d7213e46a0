// The streams: one goroutine per watcher, its calls, and what each message records.

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

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
	held     *adsHeld // ADS: what the node holds, across its calls
	streamID string   // cp: the server's id of the current call (for ReportStatus)
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
	routes   []string // ADS: the route configurations each stream asks for by name
	report   bool     // cp: report ACTIVE (ReportStatus) for each desired state, as agents do

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
	reports  int
	errors   map[string]int
	drops    map[string]int
	details  map[string]int
}

func newWorker(target, proto, etcdKey string, srcAddrs []string, channels int, nodes []node, routes []string) (*worker, error) {
	w := &worker{
		target: target, proto: proto, etcdKey: []byte(etcdKey), srcAddrs: srcAddrs, routes: routes,
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

type desired struct {
	rev    int64
	digest string
}

// onCP handles one WatchBundlesResponse; true if it ends with a closing bookmark. The
// desired states it held are added to `got`.
func (w *worker) onCP(s *stream, msg []byte, t float64, got *[]desired) (bool, error) {
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
				var digest string
				_ = fields(body, func(f protowire.Number, _ protowire.Type, v uint64, sub []byte) {
					switch f {
					case fDesiredState_revision:
						rev = int64(v)
					case fDesiredState_digest:
						digest = string(sub)
					}
				})
				s.cursor = rev
				w.receipt(rev, t)
				if digest != "" {
					*got = append(*got, desired{rev, digest})
				}
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
					case fStreamStarted_stream_id:
						s.streamID = string(sub)
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
	if w.proto == "ads-delta" || w.proto == "ads-sotw" {
		return w.onceADS(ctx, s, conn, since > 0, fail)
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
		var got []desired
		c, err := w.onCP(s, b, now(), &got)
		if err != nil {
			return gotAny, false, "BAD_MESSAGE"
		}
		closing = c
		if w.report {
			for _, d := range got {
				w.reportActive(ctx, conn, s, d)
			}
		}
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

const reportMethod = "/controlplane.node.v1.NodeService/ReportStatus"

// reportActive says the node runs `d` (ReportStatus ACTIVE), as an agent does once it
// has applied a desired state; a refusal is counted, not retried.
func (w *worker) reportActive(ctx context.Context, conn *grpc.ClientConn, s *stream, d desired) {
	w.mu.Lock()
	sid := s.streamID
	w.mu.Unlock()
	var b []byte
	b = protowire.AppendTag(b, fReportStatusRequest_node_id, protowire.BytesType)
	b = protowire.AppendString(b, s.nodeID)
	b = protowire.AppendTag(b, fReportStatusRequest_stream_id, protowire.BytesType)
	b = protowire.AppendString(b, sid)
	b = protowire.AppendTag(b, fReportStatusRequest_revision, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(d.rev))
	b = protowire.AppendTag(b, fReportStatusRequest_digest, protowire.BytesType)
	b = protowire.AppendString(b, d.digest)
	b = protowire.AppendTag(b, fReportStatusRequest_phase, protowire.VarintType)
	b = protowire.AppendVarint(b, reportPhaseActive)
	var reply []byte
	if err := conn.Invoke(ctx, reportMethod, b, &reply); err != nil {
		name, _ := codeOf(err)
		w.mu.Lock()
		w.errors["REPORT_"+name]++
		w.mu.Unlock()
		return
	}
	w.mu.Lock()
	w.reports++
	w.mu.Unlock()
}
