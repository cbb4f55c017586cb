// libcurl for the AWS KMS client: curl_easy_setopt and curl_easy_getinfo are variadic, so Swift calls these
// typed wrappers instead.
#ifndef KMSFS_CURL_H
#define KMSFS_CURL_H

#include <curl/curl.h>

typedef size_t (*kmsfs_curl_data_fn)(char *data, size_t size, size_t count, void *context);

CURLcode kmsfs_curl_set_long(CURL *curl, CURLoption option, long value);
CURLcode kmsfs_curl_set_pointer(CURL *curl, CURLoption option, const void *value);
CURLcode kmsfs_curl_set_string(CURL *curl, CURLoption option, const char *value);
CURLcode kmsfs_curl_set_offset(CURL *curl, CURLoption option, curl_off_t value);
CURLcode kmsfs_curl_set_callback(CURL *curl, CURLoption option, kmsfs_curl_data_fn callback);
CURLcode kmsfs_curl_response_code(CURL *curl, long *code);

#endif
