# shellcheck shell=bash
# make_dot_certs DIR CA_NAME: a private CA and a DoT server certificate for
# dot.test (and 127.0.0.1), both ECDSA P-256, valid two days, written to DIR:
#   ca.key ca.pem            the CA (ca.pem is what --ca-file takes)
#   server.key server.pem    the server's key and certificate
#   server-chain.pem         server.pem followed by ca.pem
# Shared by tests/peers/run.sh, benchmarks/bench.sh, benchmarks/soak.sh and
# scripts/image-test.sh. Prints openssl's chatter; fails on any error.
make_dot_certs() {
    local dir=$1 ca_name=$2
    (
        set -e
        cd "$dir"
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key.tmp
        openssl pkcs8 -topk8 -nocrypt -in ca.key.tmp -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 2 \
            -subj "/CN=$ca_name" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -addext "subjectKeyIdentifier=hash" \
            -out ca.pem
        openssl ecparam -name prime256v1 -genkey -noout -out server.key.tmp
        openssl pkcs8 -topk8 -nocrypt -in server.key.tmp -out server.key
        openssl req -new -key server.key -subj "/CN=dot.test" -out server.csr
        cat >server.ext <<'EXT'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:dot.test,IP:127.0.0.1
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EXT
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key \
            -CAcreateserial -days 2 -sha256 -extfile server.ext -out server.pem
        cat server.pem ca.pem >server-chain.pem
        rm -f ./*.tmp server.csr
        openssl verify -CAfile ca.pem server.pem
    )
}
