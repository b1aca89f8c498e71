module den/agent

go 1.19
