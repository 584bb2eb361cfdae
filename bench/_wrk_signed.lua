-- wrk script: POST pre-signed FAL webhooks, each one distinct, cycling through a file.
-- Usage: wrk ... -s bench/_wrk_signed.lua URL -- PATH FILE THREADS
-- FILE holds one request a line: request_id TAB user_id TAB timestamp TAB signature TAB body.
-- Thread k of THREADS takes lines k, k+THREADS, ... so no two threads send the same webhook;
-- a thread that runs out starts over (the benchmark counts those duplicates and says so).
-- done() prints one JSON line starting with "WRK_JSON " for the benchmark to read.

local counter = 1

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local requests = {}
local index = 0

function init(args)
  local path, file, threads = args[1], args[2], tonumber(args[3])
  local n = 0
  for line in io.lines(file) do
    if n % threads == tid - 1 then
      local rid, uid, ts, sig, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
      requests[#requests + 1] = wrk.format("POST", path, {
        ["Content-Type"] = "application/json",
        ["X-Fal-Webhook-Request-Id"] = rid,
        ["X-Fal-Webhook-User-Id"] = uid,
        ["X-Fal-Webhook-Timestamp"] = ts,
        ["X-Fal-Webhook-Signature"] = sig,
      }, body)
    end
    n = n + 1
  end
end

function request()
  index = index + 1
  if index > #requests then
    index = 1
  end
  return requests[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, '
      .. '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, '
      .. '"latency_p50_us": %d, "latency_p99_us": %d, "latency_max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
