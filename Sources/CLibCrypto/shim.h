// OpenSSL 3 libcrypto, as used by KmsfsCrypto (and SHA-256/HMAC for SigV4 in KmsfsKeys).
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <openssl/err.h>
