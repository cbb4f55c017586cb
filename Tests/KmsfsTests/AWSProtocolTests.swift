import Foundation
import Glibc
import KmsfsCrypto
import KmsfsKeys
import Testing

@Suite("SigV4 and AWS settings")
struct AWSProtocolTests {
    let example = try! AWSCredentials(accessKeyId: "AKIDEXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                                      sessionToken: nil, expiration: nil, source: "test")
    let emptyHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

    @Test("SigV4 matches the published test suite (get-vanilla, post-vanilla)")
    func publishedVectors() throws {
        for (method, expected) in [("GET", "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
                                   ("POST", "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b")] {
            let auth = try SigV4.authorization(
                SigV4.Request(method: method, path: "/", headers: [("Host", "example.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z")],
                              payloadSHA256: emptyHash),
                credentials: example, region: "us-east-1", service: "service", amzDate: "20150830T123600Z")
            #expect(auth == "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=\(expected)")
        }
        // get-vanilla-query-order-key-case: query parameters are sorted and encoded.
        let q = try SigV4.authorization(
            SigV4.Request(method: "GET", path: "/", query: [("Param2", "value2"), ("Param1", "value1")],
                          headers: [("Host", "example.amazonaws.com"), ("X-Amz-Date", "20150830T123600Z")], payloadSHA256: emptyHash),
            credentials: example, region: "us-east-1", service: "service", amzDate: "20150830T123600Z")
        #expect(q.hasSuffix("Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"))
    }

    @Test("SigV4 of a KMS request matches botocore's signer, computed in the test")
    func matchesBotocore() throws {
        let body = #"{"KeyId": "alias/x", "EncryptionContext": {"a": "b"}}"#
        let token = "FQoGZXIvYXdzEBYaDtoken/with+chars=="
        let creds = try AWSCredentials(accessKeyId: "ASIAEXAMPLE", secretAccessKey: "secret/key+example", sessionToken: token,
                                       expiration: nil, source: "test")
        let date = "20261123T101500Z"
        let headers = [("Host", "kms.eu-west-1.amazonaws.com"), ("Content-Type", "application/x-amz-json-1.1"),
                       ("X-Amz-Target", "TrentService.Decrypt"), ("X-Amz-Date", date), ("X-Amz-Security-Token", token)]
        let ours = try SigV4.authorization(SigV4.Request(method: "POST", path: "/", headers: headers,
                                                         payloadSHA256: Hex.encode(Digest.sha256(Array(body.utf8)))),
                                           credentials: creds, region: "eu-west-1", service: "kms", amzDate: date)
        let script = """
            import datetime, botocore.auth
            from unittest import mock
            from botocore.auth import SigV4Auth
            from botocore.awsrequest import AWSRequest
            from botocore.credentials import Credentials
            req = AWSRequest(method='POST', url='https://kms.eu-west-1.amazonaws.com/', data=\(String(reflecting: body)).encode(),
                headers={'Content-Type': 'application/x-amz-json-1.1', 'X-Amz-Target': 'TrentService.Decrypt'})
            fixed = datetime.datetime(2026, 11, 23, 10, 15, 0)
            with mock.patch.object(botocore.auth, 'get_current_datetime', return_value=fixed):
                SigV4Auth(Credentials('ASIAEXAMPLE', 'secret/key+example', \(String(reflecting: token))), 'kms', 'eu-west-1').add_auth(req)
            print(req.headers['Authorization'])
            """
        let r = try run(ProcessInfo.processInfo.environment["KMSFS_TEST_PYTHON"] ?? "python3", ["-c", script])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == ours)
    }

    @Test("Region: flag, then AWS_REGION, AWS_DEFAULT_REGION, the profile; a key ARN's region wins for its calls")
    func regionResolution() throws {
        let dir = try TempDir()
        try writeText(dir.path + "/config", "[default]\nregion = ap-south-1\n[profile other]\nregion = sa-east-1\n")
        let files = ["AWS_CONFIG_FILE": dir.path + "/config", "AWS_SHARED_CREDENTIALS_FILE": dir.path + "/none"]
        #expect(AWSSettings(region: "eu-west-3", profile: nil, endpoint: nil, environment: files.merging(["AWS_REGION": "us-west-1"]) { $1 }).region == "eu-west-3")
        #expect(AWSSettings(region: nil, profile: nil, endpoint: nil, environment: files.merging(["AWS_REGION": "us-west-1", "AWS_DEFAULT_REGION": "x"]) { $1 }).region == "us-west-1")
        #expect(AWSSettings(region: nil, profile: nil, endpoint: nil, environment: files.merging(["AWS_DEFAULT_REGION": "us-west-2"]) { $1 }).region == "us-west-2")
        #expect(AWSSettings(region: nil, profile: nil, endpoint: nil, environment: files).region == "ap-south-1")
        #expect(AWSSettings(region: nil, profile: "other", endpoint: nil, environment: files).region == "sa-east-1")
        #expect(AWSSettings(region: nil, profile: nil, endpoint: nil, environment: files.merging(["AWS_PROFILE": "other"]) { $1 }).region == "sa-east-1")
        let s = AWSSettings(region: "us-east-1", profile: nil, endpoint: nil, environment: files)
        #expect(try s.region(forKey: "arn:aws:kms:eu-central-1:111122223333:key/abc") == "eu-central-1")
        #expect(try s.region(forKey: "alias/x") == "us-east-1")
        let none = AWSSettings(region: nil, profile: nil, endpoint: nil, environment: ["AWS_CONFIG_FILE": "/none", "AWS_SHARED_CREDENTIALS_FILE": "/none"])
        #expect(throws: KeyError.self) { try none.region(forKey: "alias/x") }
        #expect(try none.region(forKey: "arn:aws:kms:eu-north-1:1:key/k") == "eu-north-1")
    }

    @Test("Endpoint: flag, then AWS_ENDPOINT_URL_KMS, then AWS_ENDPOINT_URL, else the region's")
    func endpointResolution() {
        let base = ["AWS_CONFIG_FILE": "/none", "AWS_SHARED_CREDENTIALS_FILE": "/none"]
        let all = base.merging(["AWS_ENDPOINT_URL_KMS": "http://kms-only", "AWS_ENDPOINT_URL": "http://any"]) { $1 }
        #expect(AWSSettings(region: nil, profile: nil, endpoint: "http://flag", environment: all).kmsEndpoint(region: "us-east-1") == "http://flag")
        #expect(AWSSettings(region: nil, profile: nil, endpoint: nil, environment: all).kmsEndpoint(region: "us-east-1") == "http://kms-only")
        #expect(AWSSettings(region: nil, profile: nil, endpoint: nil, environment: base.merging(["AWS_ENDPOINT_URL": "http://any"]) { $1 })
            .kmsEndpoint(region: "us-east-1") == "http://any")
        #expect(AWSSettings(region: nil, profile: nil, endpoint: nil, environment: base).kmsEndpoint(region: "eu-west-1") == "https://kms.eu-west-1.amazonaws.com")
        #expect(AWSSettings(region: nil, profile: nil, endpoint: nil, environment: base).kmsEndpoint(region: "cn-north-1") == "https://kms.cn-north-1.amazonaws.com.cn")
        #expect(AWSSettings(region: nil, profile: nil, endpoint: nil, environment: base).stsEndpoint(region: "eu-west-1") == "https://sts.eu-west-1.amazonaws.com")
    }
}

func writeText(_ path: String, _ text: String) throws {
    try P.writeFile(path, Array(text.utf8), mode: 0o600)
}
