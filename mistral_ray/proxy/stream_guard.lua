-- The stream guard: an HAProxy Lua service for every POST (see mistral_ray/proxy/haproxy.py).
-- It sends the request to HAProxy itself, on the internal socket of the same frontend, so routing,
-- queueing and retries stay HAProxy's; it relays the answer as it comes; and when an event-stream answer
-- breaks off before its last chunk (the replica or its node died), it continues it on another replica
-- (mid-stream migration, mistral_ray/server/migration.py) or, where that cannot be done exactly, ends the
-- client's stream the way a replica would: OpenAI's error event, then [DONE].
-- Migration: a replica that can continue a stream answers MIGRATE: ok and marks each event with the token
-- ids whose text it carries (a ":<ids>" line, ":." on the last token's); the guard takes the line out and
-- keeps the ids. On a cut it sends the request again, the ids in the body's RESUME_FIELD; the replica that
-- takes it runs the prompt plus those ids and sends the rest of the stream. Per event that is two plain
-- finds in the bytes it relays anyway and a table insert; the rest is per migration. ${...} are filled in when the config is written.

local INNER = "${INNER}"
local TIMEOUT_S = ${TIMEOUT_S}
local BAD_GATEWAY = ${BAD_GATEWAY}  -- the body of HAProxy's own 502 (openai-502.http)
local LOST = ${LOST}  -- OpenAI's error event and [DONE] (server/errors.py's sse_error)
local MAX_BODY = ${MAX_BODY}  -- router.limits.max_body_bytes: what the replica would read at most
local TOO_LARGE = ${TOO_LARGE}  -- the replica's 413 body
local STATUS_VAR = "${STATUS_VAR}"  -- the status this request's log line (Ray's request metrics) reports
local MIGRATION_LIMIT = ${MIGRATION_LIMIT}  -- router.migration_limit: continuations per stream at most
local MIGRATE = "${MIGRATE_HEADER}"
local RESUME = "${RESUME_HEADER}"
local RESUME_FIELD = "${RESUME_FIELD}"
local REPLICA = "${REPLICA_HEADER}"  -- on every answer of a replica (not on HAProxy's own)
local REPORT_TIMEOUT_S = 5  -- a report of a stream not continued waits no longer for a replica's 204
-- Hop-by-hop headers, and the framing headers this hop sets itself.
local HOP = { connection = true, ["keep-alive"] = true, ["transfer-encoding"] = true, ["content-length"] = true,
    te = true, upgrade = true, ["proxy-connection"] = true, expect = true, trailer = true }

local function request_bytes(applet, body, resumed)
    local target = applet.path
    if applet.qs and applet.qs ~= "" then
        target = target .. "?" .. applet.qs
    end
    local parts = { applet.method, " ", target, " HTTP/1.1\r\n" }
    for name, values in pairs(applet.headers) do
        if not HOP[name] then
            for _, value in pairs(values) do
                parts[#parts + 1] = name .. ": " .. value .. "\r\n"
            end
        end
    end
    if not applet.headers["host"] then  -- an HTTP/2 client's authority: HTTP/1.1 needs a Host line
        parts[#parts + 1] = "host: localhost\r\n"
    end
    if MIGRATION_LIMIT > 0 then  -- HAProxy deletes both from a client's request: only the guard sets them
        parts[#parts + 1] = MIGRATE .. ": 1\r\n"
        if resumed then
            parts[#parts + 1] = RESUME .. ": 1\r\n"
        end
    end
    parts[#parts + 1] = "content-length: " .. #body .. "\r\nconnection: close\r\n\r\n"
    parts[#parts + 1] = body
    return table.concat(parts)
end

local function answer(applet, status, body)
    applet:set_status(status)
    applet:set_var(STATUS_VAR, status)
    applet:add_header("content-type", "application/json")
    applet:add_header("content-length", tostring(#body))
    applet:start_response()
    applet:send(body)
end

local function refuse(applet)
    answer(applet, 502, BAD_GATEWAY)
end

-- The request sent to this frontend's inner socket, the socket to read its answer from (nil: not sent).
local function open(applet, body, resumed)
    local sock = core.tcp()
    sock:settimeout(TIMEOUT_S)
    if not sock:connect(INNER) or not sock:send(request_bytes(applet, body, resumed)) then
        sock:close()
        return nil
    end
    return sock
end

-- Status line and headers of an inner answer: { status, headers, chunked, length, sse, migrate }, or nil.
local function read_head(sock)
    local status_line = sock:receive("*l")
    local status = status_line and tonumber(status_line:match("^HTTP/%d%.%d (%d%d%d)"))
    if not status then
        return nil
    end
    local head = { status = status, headers = {}, chunked = false, sse = false }
    while true do
        local line = sock:receive("*l")
        if not line then
            return nil
        end
        if line == "" then
            return head
        end
        local name, value = line:match("^([^:]+):%s*(.-)%s*$")
        if name then
            local lname = name:lower()
            if lname == "transfer-encoding" then
                head.chunked = value:lower():find("chunked", 1, true) ~= nil
            elseif lname == MIGRATE then
                head.migrate = value  -- the replica's word to the guard, not the client's
            elseif not HOP[lname] or lname == "content-length" then
                if lname == REPLICA then
                    head.replica = value
                end
                if lname == "content-length" then
                    head.length = tonumber(value)
                elseif lname == "content-type" and value:find("text/event-stream", 1, true) then
                    head.sse = true
                end
                head.headers[#head.headers + 1] = { lname, value }
            end
        end
    end
end

local function relay_head(applet, head)
    applet:set_status(head.status)
    applet:set_var(STATUS_VAR, head.status)
    for _, header in ipairs(head.headers) do
        applet:add_header(header[1], header[2])
    end
    applet:start_response()
end

-- What the client got of a stream: the ids behind its text (strings of space-separated ids), its first and
-- last events' bytes, whether it got the last token's.
local function new_stream()
    local stream = { ids = {}, finished = false }
    stream.keep = function(line)
        if line:find("[^%d %.]") or line:find(" ", 1, true) == 1 then
            return nil  -- another comment line (an SSE keep-alive): not ours, left as it is
        end
        if line:byte(1) == 46 then  -- "."
            stream.finished = true
            line = line:sub(2)
        end
        if line ~= "" then
            stream.ids[#stream.ids + 1] = line
        end
        return "\n"
    end
    return stream
end

-- The bytes without the replica's marks, whose ids the stream keeps. Usually one event, its mark its last
-- line (JSON has no raw newline, so the "\n:" near its end is the mark's): two plain finds; else a gsub.
local function unmark(out, stream)
    local n = #out
    if out:find("\n\n", 1, true) == n - 1 then
        local at = out:find("\n:", n > 64 and n - 63 or 1, true)
        if at then
            return stream.keep(out:sub(at + 2, n - 2)) and (out:sub(1, at) .. "\n") or out
        end
    end
    return (out:gsub("\n:([^\n]*)\n", stream.keep))
end

local function forward(applet, out, stream)
    if stream.keep then
        out = unmark(out, stream)
        stream.first = stream.first or out
    end
    stream.last = out
    applet:send(out)
end

-- Chunked body, forwarded event by event: bytes after the last blank line wait for the rest of their
-- event, so a cut never leaves half an event in front of what follows. Returns whether it ended.
local function relay_chunks(applet, sock, stream)
    local held = ""
    while true do
        local size_line = sock:receive("*l")
        local size = size_line and tonumber(size_line:match("^%x+") or "", 16)
        if not size then
            return false
        end
        if size == 0 then
            if held ~= "" then
                forward(applet, held, stream)
            end
            return true
        end
        local data = sock:receive(size)
        if not data or not sock:receive("*l") then
            return false
        end
        data = held .. data
        if data:sub(-2) == "\n\n" then
            held = ""
            forward(applet, data, stream)
        else
            local cut = data:match(".*\n\n()")
            if cut then
                forward(applet, data:sub(1, cut - 1), stream)
                held = data:sub(cut)
            else
                held = data
            end
        end
    end
end

local function now_ms()
    local t = core.now()
    return t.sec * 1000 + t.usec / 1000
end

-- The client's body with RESUME_FIELD added as its last member: a continuation of `stream`, or a report.
local function resumed_body(body, field)
    local head = body:match("^(.-)}%s*$")
    if not head then
        return nil
    end
    return head .. (head:match("{%s*$") and "" or ",") .. '"' .. RESUME_FIELD .. '":' .. field .. "}"
end

local function continuation_field(stream, cut_ms)
    local ids = table.concat(stream.ids, " "):gsub(" ", ",")
    local first = stream.first or ""
    local id, created = first:match('"id":%s*"([^"\\]*)"'), first:match('"created":%s*(%d+)')
    return '{"ids":[' .. ids .. '],"events":' .. (stream.first and 1 or 0) .. ',"finished":'
        .. tostring(stream.finished) .. ',"cut_ms":' .. string.format("%.0f", cut_ms)
        .. (id and (',"id":"' .. id .. '"') or "") .. (created and (',"created":' .. created) or "") .. "}"
end

local function send_report(request)
    local sock = core.tcp()
    sock:settimeout(REPORT_TIMEOUT_S)
    if sock:connect(INNER) and sock:send(request) then
        sock:receive("*l")
    end
    sock:close()
end

-- How a cut stream the guard could not continue ended, told to a replica (which counts it): best effort,
-- from a task of its own, so the client's stream ends without waiting for it.
local function report(applet, body, why)
    local resumed = resumed_body(body, '{"report":"' .. why .. '"}')
    if resumed then
        core.register_task(send_report, request_bytes(applet, resumed, true))
    end
end

-- After a cut: continue the stream on other replicas, up to MIGRATION_LIMIT tries (a continuation lost
-- again, or refused with 503 by a full replica, takes one). Returns nil when it ended, else why not
-- ("outcome:reason" to report, or false when a replica refused it and counted that).
local function migrate(applet, body, stream, why)
    local tries = 0
    while not why do
        if tries >= MIGRATION_LIMIT then
            return "failed:limit"
        end
        tries = tries + 1
        local resumed = resumed_body(body, continuation_field(stream, now_ms()))
        local sock = resumed and open(applet, resumed, true)
        local head = sock and read_head(sock)
        local continued = head and head.status == 200 and head.chunked and head.migrate == "ok"
        if not continued then
            if sock then
                sock:close()
            end
            if not head or head.status ~= 503 then
                -- A replica's refusal (it counted it), or else no answer, HAProxy's own status (no replica
                -- left), or an answer that is not a continuation (a replica that does not know them): not
                -- relayed, and reported.
                local counted = head and head.replica and head.status ~= 200
                return (not counted) and "failed:refused" or false
            end
            -- 503: that replica was full; the next try may find room
        else
            local ended = relay_chunks(applet, sock, stream)
            sock:close()
            if ended or (stream.last and stream.last:sub(-14) == "data: [DONE]\n\n") then
                return nil
            end
        end
    end
    return why
end

core.register_service("mistral_stream_guard", "http", function(applet)
    -- A declared length over MAX_BODY never comes here; a body of no declared length (chunked, HTTP/2) is
    -- read up to one byte past it, so memory stays bounded whatever the client sends.
    local body = applet:receive(MAX_BODY + 1) or ""
    if #body > MAX_BODY then
        return answer(applet, 413, TOO_LARGE)
    end
    local sock = open(applet, body, false)
    local head = sock and read_head(sock)
    if not head then
        if sock then
            sock:close()
        end
        return refuse(applet)
    end
    relay_head(applet, head)
    local stream = { }
    if head.migrate == "ok" and head.sse then
        stream = new_stream()
    end
    local ended
    if head.chunked then
        ended = relay_chunks(applet, sock, stream)
    elseif head.length then
        local data = head.length > 0 and sock:receive(head.length) or ""
        ended = data ~= nil
        applet:send(data or "")
    else
        applet:send(sock:receive("*a") or "")
        ended = true
    end
    sock:close()
    if ended or not head.sse or (stream.last and stream.last:sub(-14) == "data: [DONE]\n\n") then
        return
    end
    local why = nil
    if not stream.keep then
        why = "not_possible:" .. (head.migrate or "route")
    end
    why = migrate(applet, body, stream, why)
    if why == nil then
        return  -- continued to its end on another replica
    end
    applet:send(LOST)
    applet:set_var(STATUS_VAR, 502)  -- what the client got: the error event's status
    if why and MIGRATION_LIMIT > 0 then
        report(applet, body, why)
    end
end)
