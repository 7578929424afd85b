module tqproxy.example/goworker

go 1.19
