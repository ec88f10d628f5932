-- wrk script of the benchmark harness: POST /v1/events with unique, realistic events.
--
-- Configured through the environment (bench/wrk.py sets these):
--   BENCH_TOKEN        the events:write key ("" for the peers, which take no key)
--   BENCH_PREFIX       random prefix of this run; ids are PREFIX-THREAD-REQUEST-INDEX
--   BENCH_TIME         the events' time, RFC 3339 (the run's start: inside the lateness window)
--   BENCH_TENANTS      how many tenants the events are spread over: t00000, t00001, ...
--   BENCH_BATCH        1: one event object per request; N > 1: {"events": [N events]}
--   BENCH_DUP_EVERY    in a batch, every DUP_EVERY-th event repeats one of the request this
--                      thread last had answered (same id, same content: a duplicate); 0: none.
--                      Batch loads run one connection per thread, so that request is the one
--                      just before. (Not "request number - 1": wrk calls request() once more,
--                      on thread 1, to check the script, and never sends that request.)
--   BENCH_RATE         pacing: requests per second of the whole run (0: as fast as answered).
--                      Each thread keeps a fixed schedule of BENCH_RATE / BENCH_THREADS
--                      requests per second and delay() holds each request until its slot, so
--                      the offered rate does not fall as latency rises (a slot missed because
--                      every connection was busy is skipped, not made up in a burst)
--   BENCH_THREADS      wrk's thread count (for the per-thread share of BENCH_RATE)
--   BENCH_MAX_REQUESTS per-thread cap on requests (a bound on top of wrk's --duration)
--
-- Every event is a pure function of (thread, request, index), so a repeated one has exactly
-- the content of the original. done() prints one line "BENCH_RESULT {json}" for the harness.

local token = os.getenv("BENCH_TOKEN") or ""
local prefix = assert(os.getenv("BENCH_PREFIX"), "BENCH_PREFIX is not set")
local event_time = assert(os.getenv("BENCH_TIME"), "BENCH_TIME is not set")
local tenants = tonumber(os.getenv("BENCH_TENANTS") or "1")
local batch = tonumber(os.getenv("BENCH_BATCH") or "1")
local dup_every = tonumber(os.getenv("BENCH_DUP_EVERY") or "0")
local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local thread_total = tonumber(os.getenv("BENCH_THREADS") or "1")
local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "100000000")

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("tid", thread_count)
  table.insert(threads, thread)
end

-- Per-thread state (each wrk thread has its own Lua state).
tid = 0
sent = 0
last_answered = 0
sent_events = 0
dup_sent = 0
dup_pending = 0
dup_answered = 0
responses = 0
ok = 0
non2xx = 0
answered_events = 0
accepted = 0
duplicates = 0
rejected = 0
capped = 0

local headers = { ["Content-Type"] = "application/json" }
if token ~= "" then
  headers["Authorization"] = "Bearer " .. token
end

local regions = { "eu-west", "eu-central", "us-east", "ap-south" }
local plans = { "free", "pro", "enterprise" }
local models = { "small", "medium", "large", "xl", "embed" }
local features = { "chat", "search", "batch", "tools", "vision", "audio" }
local sizes = { 128, 256, 512, 1024, 2048 }
local types = { { "llm.tokens", "token" }, { "llm.tokens", "token" }, { "compute.vcpu_seconds", "s" } }

local function pick(list, n)
  return list[(n % #list) + 1]
end

local function event(request, index)
  local n = request * 1009 + index * 7919 + tid * 104729
  local kind = pick(types, n)
  local attributes = '{"region":"' .. pick(regions, n) .. '","plan":"' .. pick(plans, math.floor(n / 4))
    .. '","model":"' .. pick(models, math.floor(n / 12)) .. '","feature":"' .. pick(features, math.floor(n / 60))
  if n % 2 == 0 then
    attributes = attributes .. '","context":' .. pick(sizes, math.floor(n / 7)) .. '}'
  else
    attributes = attributes .. '"}'
  end
  return '{"id":"' .. prefix .. "-" .. tid .. "-" .. request .. "-" .. index
    .. '","tenant":"' .. string.format("t%05d", (request * 31 + index) % tenants)
    .. '","type":"' .. kind[1] .. '","quantity":"' .. (n % 4000) / 4
    .. '","time":"' .. event_time .. '","subject":"user-' .. (n % 97)
    .. '","unit":"' .. kind[2] .. '","attributes":' .. attributes .. "}"
end

function request()
  sent = sent + 1
  sent_events = sent_events + batch
  local body
  if batch == 1 then
    body = event(sent, 1)
  else
    local parts = {}
    dup_pending = 0
    for i = 1, batch do
      if dup_every > 0 and i % dup_every == 0 and last_answered > 0 then
        -- The event at i - 1 of an answered request: never itself a repeat.
        parts[i] = event(last_answered, i - 1)
        dup_sent = dup_sent + 1
        dup_pending = dup_pending + 1
      else
        parts[i] = event(sent, i)
      end
    end
    body = '{"events":[' .. table.concat(parts, ",") .. "]}"
  end
  return wrk.format("POST", "/v1/events", headers, body)
end

local now_ms = function() return 0 end
if rate > 0 then
  local ffi = require("ffi")  -- wrk runs LuaJIT; os.clock is CPU time, os.time is in seconds
  ffi.cdef([[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clock, bench_timespec *now);
  ]])
  local now = ffi.new("bench_timespec")
  now_ms = function()
    ffi.C.clock_gettime(1, now) -- CLOCK_MONOTONIC
    return tonumber(now.tv_sec) * 1000 + tonumber(now.tv_nsec) / 1e6
  end
end
local interval_ms = rate > 0 and 1000 * thread_total / rate or 0
local next_slot = nil

function delay()
  if interval_ms == 0 then
    return 0
  end
  local now = now_ms()
  if next_slot == nil or next_slot < now - interval_ms then
    next_slot = now -- behind schedule (all connections were busy): no catch-up burst
  else
    next_slot = next_slot + interval_ms
  end
  local wait = next_slot - now
  return wait > 0 and math.floor(wait + 0.5) or 0
end

function response(status, _, body)
  responses = responses + 1
  if status >= 200 and status <= 299 then
    last_answered = sent -- one connection per thread in batch loads: the request just made
    dup_answered = dup_answered + dup_pending -- the repeats that request carried
  end
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  else
    ok = ok + 1
    answered_events = answered_events + batch
    if batch == 1 then
      if body:find('"status": *"accepted"') then
        accepted = accepted + 1
      elseif body:find('"status": *"duplicate"') then
        duplicates = duplicates + 1
      else
        rejected = rejected + 1
      end
    else
      accepted = accepted + (tonumber(body:match('"accepted": *(%d+)')) or 0)
      duplicates = duplicates + (tonumber(body:match('"duplicates": *(%d+)')) or 0)
      rejected = rejected + (tonumber(body:match('"rejected": *(%d+)')) or 0)
    end
  end
  if responses >= max_requests then
    capped = 1
    wrk.thread:stop()
  end
end

function done(summary, latency, _)
  local names = { "sent", "sent_events", "dup_sent", "dup_answered", "responses", "ok", "non2xx",
                  "answered_events", "accepted", "duplicates", "rejected", "capped" }
  local totals = {}
  for _, name in ipairs(names) do
    totals[name] = 0
    for _, thread in ipairs(threads) do
      totals[name] = totals[name] + thread:get(name)
    end
  end
  local e = summary.errors
  local parts = {
    string.format('"requests":%d,"duration_us":%d,"bytes":%d', summary.requests,
                  summary.duration, summary.bytes),
    string.format('"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,'
                  .. '"timeouts":%d', e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f',
                  latency:percentile(50), latency:percentile(90), latency:percentile(99),
                  latency.max, latency.mean),
  }
  for _, name in ipairs(names) do
    table.insert(parts, string.format('"%s":%d', name, totals[name]))
  end
  io.write("BENCH_RESULT {" .. table.concat(parts, ",") .. "}\n")
end
