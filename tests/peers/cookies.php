<?php
// PHP's view of a request's cookies, as a webmail (Roundcube) reads them: $_COOKIE is built
// from the Cookie line(s) the way PHP joins them, which is where a crumbled HTTP/2 cookie
// field list would lose the session (RFC 9113 §8.2.3).
header('Content-Type: application/json');
echo json_encode([
    'cookies' => (object) $_COOKIE,
    'raw' => $_SERVER['HTTP_COOKIE'] ?? null,
    'host' => $_SERVER['HTTP_HOST'] ?? null,
    'https' => $_SERVER['HTTP_X_FORWARDED_PROTO'] ?? null,
]);
