from isthmus.dataplane.envoy.hashing import xxh64, xxh64_many


def test_reference_vectors():
    # Published XXH64 test vectors (seed 0), covering the <4, <32 and >=32 byte paths.
    assert xxh64(b"") == 0xEF46DB3751D8E999
    assert xxh64(b"a") == 0xD24EC4F1A98C6E5B
    assert xxh64(b"abc") == 0x44BC2CF5AD770999
    assert xxh64(b"Nobody inspects the spammish repetition") == 0xFBCEA83C8A378BF1


def test_seed_and_str():
    assert xxh64("abc") == xxh64(b"abc")
    assert xxh64(b"abc", 1) != xxh64(b"abc", 0)


def test_many_chains_seed():
    assert xxh64_many(["a"]) == xxh64("a")
    assert xxh64_many(["a", "b"]) == xxh64("b", xxh64("a"))
