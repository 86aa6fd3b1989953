-- The stream guard: an HAProxy Lua service for every POST (see mistral_ray/proxy/haproxy.py).
-- It sends the request to HAProxy itself, on the internal socket of the same frontend, so routing,
-- queueing and retries stay HAProxy's; it relays the answer as it comes; and when an event-stream answer
-- breaks off before its last chunk (the replica or its node died), it ends the client's stream the way a
-- replica would: OpenAI's error event, then [DONE]. ${...} are filled in when the config is written.

local INNER = "${INNER}"
local TIMEOUT_S = ${TIMEOUT_S}
local BAD_GATEWAY = ${BAD_GATEWAY}  -- the body of HAProxy's own 502 (openai-502.http)
local LOST = ${LOST}  -- OpenAI's error event and [DONE] (server/errors.py's sse_error)
local MAX_BODY = ${MAX_BODY}  -- router.limits.max_body_bytes: what the replica would read at most
local TOO_LARGE = ${TOO_LARGE}  -- the replica's 413 body
local STATUS_VAR = "${STATUS_VAR}"  -- the status this request's log line (Ray's request metrics) reports
-- Hop-by-hop headers, and the framing headers this hop sets itself.
local HOP = { connection = true, ["keep-alive"] = true, ["transfer-encoding"] = true, ["content-length"] = true,
    te = true, upgrade = true, ["proxy-connection"] = true, expect = true, trailer = true }

local function request_bytes(applet, body)
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

-- Status line and headers of the inner answer, copied to the client's. Returns chunked, length, is_sse.
local function relay_head(applet, sock, status_line)
    local status = tonumber(status_line:match("^HTTP/%d%.%d (%d%d%d)"))
    if not status then
        return nil
    end
    applet:set_status(status)
    applet:set_var(STATUS_VAR, status)
    local chunked, length, sse = false, nil, false
    while true do
        local line = sock:receive("*l")
        if not line then
            return nil
        end
        if line == "" then
            break
        end
        local name, value = line:match("^([^:]+):%s*(.-)%s*$")
        if name then
            local lname = name:lower()
            if lname == "transfer-encoding" then
                chunked = value:lower():find("chunked", 1, true) ~= nil
            elseif lname == "content-length" then
                length = tonumber(value)
                applet:add_header(lname, value)
            elseif not HOP[lname] then
                if lname == "content-type" and value:find("text/event-stream", 1, true) then
                    sse = true
                end
                applet:add_header(lname, value)
            end
        end
    end
    applet:start_response()
    return chunked, length, sse
end

-- Chunked body, forwarded event by event: bytes after the last blank line wait for the rest of their
-- event, so a cut never leaves half an event in front of the error event. Returns whether it ended.
local function relay_chunks(applet, sock)
    local held = ""
    while true do
        local size_line = sock:receive("*l")
        local size = size_line and tonumber(size_line:match("^%x+") or "", 16)
        if not size then
            return false
        end
        if size == 0 then
            if held ~= "" then
                applet:send(held)
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
            applet:send(data)
        else
            local cut = data:match(".*\n\n()")
            if cut then
                applet:send(data:sub(1, cut - 1))
                held = data:sub(cut)
            else
                held = data
            end
        end
    end
end

core.register_service("mistral_stream_guard", "http", function(applet)
    -- A declared length over MAX_BODY never comes here; a body of no declared length (chunked, HTTP/2) is
    -- read up to one byte past it, so memory stays bounded whatever the client sends.
    local body = applet:receive(MAX_BODY + 1) or ""
    if #body > MAX_BODY then
        return answer(applet, 413, TOO_LARGE)
    end
    local sock = core.tcp()
    sock:settimeout(TIMEOUT_S)
    if not sock:connect(INNER) or not sock:send(request_bytes(applet, body)) then
        sock:close()
        return refuse(applet)
    end
    local status_line = sock:receive("*l")
    local chunked, length, sse = nil, nil, false
    if status_line then
        chunked, length, sse = relay_head(applet, sock, status_line)
    end
    if chunked == nil then
        sock:close()
        return refuse(applet)
    end
    local ended
    if chunked then
        ended = relay_chunks(applet, sock)
    elseif length then
        local data = length > 0 and sock:receive(length) or ""
        ended = data ~= nil
        applet:send(data or "")
    else
        applet:send(sock:receive("*a") or "")
        ended = true
    end
    sock:close()
    if not ended and sse then
        applet:send(LOST)
        applet:set_var(STATUS_VAR, 502)  -- what the client got: the error event's status
    end
end)
