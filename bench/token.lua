-- wrk script: one OAuth 2.0 client_credentials token request (client_secret_post), repeated.
-- The form body comes from WRK_BODY (run.sh reads it from the bench data dir).
local body = os.getenv("WRK_BODY")
if body == nil or body == "" then
  error("WRK_BODY is not set")
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.body = body
