#!/usr/bin/env python3
"""The reference for bench/client_bench.sh: `aviary status JOB` and `aviary list` made by a
Python gRPC client (Debian's python3-grpcio, messages from protoc --python_out of
proto/aviary.proto), one process per call as a user's shell would run it.

usage: client_reference.py PB2_DIR HOST:PORT TOKEN_FILE status JOB | list [LIMIT]
"""
import sys


def main():
    pb2_dir, target, token_file, command = sys.argv[1:5]
    sys.path.insert(0, pb2_dir)
    import grpc
    import aviary_pb2

    token = open(token_file).read().strip()
    metadata = (("authorization", "Bearer " + token),)
    channel = grpc.insecure_channel(target)
    if command == "status":
        get_job = channel.unary_unary("/aviary.v1.JobService/GetJob",
                                      request_serializer=aviary_pb2.GetJobRequest.SerializeToString,
                                      response_deserializer=aviary_pb2.JobInfo.FromString)
        job = get_job(aviary_pb2.GetJobRequest(job_id=sys.argv[5]), metadata=metadata, timeout=30)
        print(job.job_id, aviary_pb2.JobState.Name(job.state), job.name)
        for t in job.tasks:
            print(" ", t.task_id, t.stage, t.fold, aviary_pb2.TaskState.Name(t.state))
    elif command == "list":
        list_jobs = channel.unary_unary("/aviary.v1.JobService/ListJobs",
                                        request_serializer=aviary_pb2.ListJobsRequest.SerializeToString,
                                        response_deserializer=aviary_pb2.ListJobsResponse.FromString)
        limit = int(sys.argv[5]) if len(sys.argv) > 5 else 20
        reply = list_jobs(aviary_pb2.ListJobsRequest(limit=limit), metadata=metadata, timeout=30)
        for job in reply.jobs:
            print(job.job_id, aviary_pb2.JobState.Name(job.state), job.name)
    else:
        sys.exit(f"unknown command {command}")


if __name__ == "__main__":
    main()
