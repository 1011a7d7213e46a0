// Command loadgen holds a slice of the benchmark's watch streams: the Go twin of
// bench/loadgen.py, with the same JSON-lines commands on stdin and answers on stdout
// (open, storm, wait, receipts, close, stats, quit), so bench/workers.py drives either.
//
// It speaks these protocols, chosen by --proto:
//
//	cp         controlplane.watch.v1.WatchService/WatchBundles (the control plane and
//	           bench/bareserver.py), one server-streaming call per node;
//	etcd       etcdserverpb.Watch/Watch, one bidirectional call per node holding one
//	           watcher on --etcd-key;
//	ads-delta  Envoy's DeltaAggregatedResources, one call per node (ads.go);
//	ads-sotw   Envoy's StreamAggregatedResources (state of the world), the same way.
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
	"flag"
	"fmt"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

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
			"reports": w.reports,
			"ready": ready, "cpu": cpu, "connections": len(w.conns),
		}, nil
	}
	return nil, fmt.Errorf("unknown command %q", c.str("cmd", ""))
}

func main() {
	target := flag.String("target", "", "host:port of the server")
	nodesFile := flag.String("nodes-file", "", "JSON list of {node_id, token|credential}")
	channels := flag.Int("channels", 1, "HTTP/2 connections")
	proto := flag.String("proto", "cp", "cp (WatchBundles), etcd (etcd v3 Watch), ads-delta or ads-sotw (Envoy's ADS)")
	adsRoutes := flag.String("ads-routes", "", "ADS: comma-separated route configuration names each stream asks for")
	report := flag.Bool("report", false, "cp: report ACTIVE (ReportStatus) for each desired state, as agents do")
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
	if *proto != "cp" && *proto != "etcd" && *proto != "ads-delta" && *proto != "ads-sotw" {
		fmt.Fprintf(os.Stderr, "--proto: %q is not cp, etcd, ads-delta or ads-sotw\n", *proto)
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
	var routes []string
	if *adsRoutes != "" {
		routes = strings.Split(*adsRoutes, ",")
	}
	w, err := newWorker(*target, *proto, *etcdKey, addrs, *channels, nodes, routes)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	w.report = *report
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
